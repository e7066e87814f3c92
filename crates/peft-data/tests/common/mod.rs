//! Shared test fixtures: a tiny BERT-style WordPiece tokenizer built in code (no files).

#![allow(dead_code)]

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

/// Vocabulary of the tiny tokenizer; ids are positions.
pub const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "eu", "rejects", "german", "call", "to", "boycott",
    "british", "lamb", ".", "peter", "black", "##burn", "new", "york", "u", "s", "jo", "##hn",
    "##s", "in", "paris",
];

/// Id of a vocabulary entry.
pub fn id(token: &str) -> u32 {
    VOCAB.iter().position(|t| *t == token).unwrap() as u32
}

/// Lower-casing WordPiece tokenizer adding `[CLS] ... [SEP]`, like BERT uncased.
pub fn tiny_tokenizer() -> Tokenizer {
    let vocab = WordPiece::read_bytes(VOCAB.join("\n").as_bytes()).unwrap();
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::default()));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .special_tokens(vec![("[CLS]", id("[CLS]")), ("[SEP]", id("[SEP]"))])
            .build()
            .unwrap(),
    ));
    tok
}

/// Whitespace-separated words as owned strings.
pub fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}
