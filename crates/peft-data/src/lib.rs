//! Datasets, tokenization with label alignment, and batching for peft-rs.
//!
//! This crate has no tensor dependency: it produces plain `Vec` buffers that the caller turns
//! into tensors. The token classification pipeline is
//!
//! 1. [`read_conll`] a CoNLL file into [`Sentence`]s (IOB1 converted to IOB2),
//! 2. [`LabelSet::from_sentences`] on the training split, [`LabelSet::check_split`] on the others,
//! 3. [`Aligner::encode_all`] to sub-token ids and aligned labels,
//! 4. [`Batcher`] to plan batches and [`Collator`] to pad them into a [`Batch`],
//! 5. [`word_tags`] to map token predictions back to words.
//!
//! The [`image`] module is the image classification pipeline: IDX / image folder / CSV
//! sources, torchvision-equivalent resize, crop, augmentation and normalisation, splits, and
//! batches built in background threads.
//!
//! ```
//! use peft_data::{parse_conll_str, AlignOptions, Aligner, Batcher, Collator, LabelSet, TagScheme};
//! # use tokenizers::{models::wordpiece::WordPiece, normalizers::BertNormalizer,
//! #     pre_tokenizers::bert::BertPreTokenizer, processors::template::TemplateProcessing, Tokenizer};
//! # fn tiny_tokenizer() -> Tokenizer {
//! #     let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "eu", "rejects", "german", "call",
//! #         "peter", "black", "##burn"];
//! #     let vocab = WordPiece::read_bytes(vocab.join("\n").as_bytes()).unwrap();
//! #     let model = WordPiece::builder().vocab(vocab).unk_token("[UNK]".into()).build().unwrap();
//! #     let mut tok = Tokenizer::new(model);
//! #     tok.with_normalizer(Some(BertNormalizer::default()));
//! #     tok.with_pre_tokenizer(Some(BertPreTokenizer));
//! #     tok.with_post_processor(Some(TemplateProcessing::builder()
//! #         .try_single("[CLS] $A [SEP]").unwrap()
//! #         .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)]).build().unwrap()));
//! #     tok
//! # }
//! let train = "-DOCSTART- -X- O\n\nEU B-ORG\nrejects O\nGerman B-MISC\ncall O\n\n\
//!              Peter B-PER\nBlackburn I-PER\n";
//! let train = parse_conll_str(train, "train.txt", TagScheme::Auto)?;
//! let labels = LabelSet::from_sentences(&train);
//! assert_eq!(labels.len(), 7); // O + B/I for MISC, ORG, PER
//!
//! // Usually `Aligner::from_file("tokenizer.json", ..)`.
//! let aligner = Aligner::new(tiny_tokenizer(), AlignOptions::default())?;
//! let split = aligner.encode_all(&train, &labels)?;
//! // [CLS] peter black ##burn [SEP]: the second sub-token of "Blackburn" is ignored.
//! let b_per = labels.id("B-PER").unwrap() as i64;
//! let i_per = labels.id("I-PER").unwrap() as i64;
//! assert_eq!(split.items[1].labels, [-100, b_per, i_per, -100, -100]);
//!
//! let batcher = Batcher::new(split.lengths(), 2, 0)?;
//! let collator = Collator::new(aligner.pad_id());
//! for indices in batcher.epoch_batches(0) {
//!     let batch = collator.collate(&split.items, &indices)?;
//!     assert_eq!(batch.input_ids.len(), batch.batch_size * batch.seq_len);
//!     // ... turn the buffers into tensors, run the model, take the argmax per token ...
//!     let preds: Vec<u32> = batch.labels.iter().map(|&l| l.max(0) as u32).collect();
//!     for (row, &i) in batch.indices.iter().enumerate() {
//!         let tags = split.items[i].word_tags(&preds[batch.row_range(row)], &labels)?;
//!         assert_eq!(tags, train[i].tags);
//!     }
//! }
//! # Ok::<(), peft_data::DataError>(())
//! ```

#![warn(missing_docs)]

mod align;
mod batch;
mod batcher;
mod conll;
mod decode;
mod error;
pub mod image;
mod labels;
mod scheme;

pub use align::{AlignOptions, Aligner, Encoded, EncodedSplit, IGNORE_INDEX};
pub use batch::{Batch, Collator};
pub use batcher::Batcher;
pub use conll::{parse_conll_str, read_conll, Sentence};
pub use decode::{word_tags, OUTSIDE};
pub use error::{DataError, Result};
pub use labels::LabelSet;
pub use scheme::{detect_scheme, iob1_to_iob2, Tag, TagScheme};
