//! `peft-rs train`: a recipe becomes library calls.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use peft_core::adapter_io::{self, AdapterMeta};
use peft_core::device::{parse_device, parse_dtype};
use peft_core::{AdapterConfig, PromptTuningConfig, TuningPlan};
use peft_data::{AlignOptions, Batcher, Collator, LabelSet};
use peft_models::{bert_token_classifier, resolve_model};
use peft_train::ner::{aligner_for, load_split, settings, TASK};
use peft_train::optim::AdamWConfig;
use peft_train::tasks::token_classification::{evaluate_tags, TokenClassification};
use peft_train::{Trainer, TrainerConfig};

use crate::recipe::{Recipe, TaskKind};

/// Sentences per evaluation batch.
const EVAL_BATCH: usize = 64;

/// Trains the recipe at `recipe_path` (with `key=value` overrides) and writes its adapter.
pub fn run(recipe_path: &Path, overrides: &[String], progress: bool) -> Result<()> {
    let started = Instant::now();
    let recipe = Recipe::load(recipe_path, overrides)?;
    if recipe.task.kind == TaskKind::ImageClassification {
        return super::train_image::run(recipe_path, &recipe, overrides, progress, started);
    }
    let device = parse_device(&recipe.model.device)?;
    let dtype = parse_dtype(&recipe.model.dtype)?;
    let precision =
        super::apply_matmul_precision(&recipe.model.matmul_precision, "model.matmul_precision")?;
    tracing::info!(
        "products with frozen weights: {precision}; f32 GEMM: {}",
        peft_core::ops::f32_gemm_backend()
    );
    let files = resolve_model(&recipe.model.name)?;
    let options = AlignOptions {
        label_all_subtokens: recipe.task.label_all_subtokens,
        max_len: Some(recipe.task.max_length),
    };
    let aligner = aligner_for(&files, options)?;
    let d = recipe
        .data
        .as_ref()
        .context("token classification needs a [data] table")?;
    let mut train_sentences = peft_data::read_conll(&d.train, d.tag_scheme)?;
    if let Some(n) = d.limit_train {
        train_sentences.truncate(n);
    }
    if train_sentences.is_empty() {
        anyhow::bail!("{}: no training sentences", d.train.display());
    }
    let labels = LabelSet::from_sentences(&train_sentences);
    let train_items = aligner.encode_all(&train_sentences, &labels)?.items;
    let valid = load_split(&d.valid, d.tag_scheme, &labels, &aligner, "valid")?;
    let test = d
        .test
        .as_ref()
        .map(|p| load_split(p, d.tag_scheme, &labels, &aligner, "test"))
        .transpose()?;
    tracing::info!(
        "data: {} train, {} valid, {} test sentences; {} labels",
        train_items.len(),
        valid.sentences.len(),
        test.as_ref().map_or(0, |t| t.sentences.len()),
        labels.len()
    );

    let mut adapter = recipe.adapter.clone();
    if let Some(AdapterConfig::PromptTuning(c)) = &mut adapter {
        fill_prompt_token_ids(c, &aligner)?;
    }
    let plan = TuningPlan {
        adapter,
        unfreeze: recipe.tuning.unfreeze.clone(),
        seed: recipe.train.seed,
    };
    let model = bert_token_classifier(&files, plan, labels.len(), &device, dtype)?;
    let trainable = model.parts.params.num_elements();
    tracing::info!(
        "model {}: {} adapted linears, {trainable} trainable parameters",
        files.name,
        model.parts.registry.adapted_paths().len()
    );
    let collator = Collator::new(aligner.pad_id());
    let lengths: Vec<usize> = train_items.iter().map(|e| e.len()).collect();
    let batcher = Batcher::new(lengths, recipe.train.batch_size, recipe.train.seed)?;
    let task = TokenClassification::new(
        &model,
        train_items,
        valid.encoded.items.clone(),
        valid.gold(),
        labels.clone(),
        collator,
        batcher,
    );
    let trainer = Trainer::new(
        trainer_config(&recipe, progress),
        model.parts.params.named_vars(),
    )?;
    let summary = trainer.fit(&task)?;

    let test_scores = match &test {
        Some(split) => Some(evaluate_tags(
            &model,
            &split.encoded.items,
            &split.gold(),
            &labels,
            &collator,
            EVAL_BATCH,
        )?),
        None => None,
    };
    let mut data_paths = vec![("train", d.train.as_path()), ("valid", d.valid.as_path())];
    if let Some(p) = &d.test {
        data_paths.push(("test", p.as_path()));
    }
    let meta = AdapterMeta {
        base_model_fingerprint: model.parts.base_fingerprint.clone(),
        task: TASK.into(),
        unfreeze: recipe.tuning.unfreeze.clone(),
        id2label: labels.to_id2label(),
        tokenizer: files.name.clone(),
        settings: settings(&options, d.tag_scheme, &data_paths),
    };
    let out = &recipe.output.adapter_dir;
    adapter_io::save(out, &model.parts, &files.name, "TOKEN_CLS", &meta)?;
    let adapter_bytes = peft_core::fsio::folder_bytes(out)?;
    super::card::write(
        out,
        &super::card::CardFacts {
            recipe: recipe_path,
            overrides,
            base_model: &files.name,
            data: &data_paths,
            trainable,
            adapter_bytes,
            summary: &summary,
            test: test_scores.as_ref(),
            labels: labels.names(),
        },
    )?;
    let report = serde_json::json!({
        "recipe": recipe_path.display().to_string(),
        "overrides": overrides,
        "model": files.name,
        "trainable_parameters": trainable,
        "adapter_dir": out.display().to_string(),
        "adapter_bytes": adapter_bytes,
        "train": summary,
        "test": test_scores,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    let report_path = recipe.output.run_dir.join("summary.json");
    peft_core::fsio::write_atomic(
        &report_path,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )
    .with_context(|| format!("writing {}", report_path.display()))?;
    println!("adapter       {}", out.display());
    println!("trainable     {trainable} parameters");
    println!("adapter size  {adapter_bytes} bytes");
    if let Some(best) = &summary.best {
        println!(
            "valid F1      {:.4} (epoch {})",
            best.score, summary.best_epoch
        );
    }
    if let Some(s) = &test_scores {
        println!(
            "test F1       {:.4} (P {:.4}, R {:.4})",
            s.overall.f1, s.overall.precision, s.overall.recall
        );
    }
    println!(
        "train time    {:.0} s ({:.0} tokens/s)",
        summary.train_seconds, summary.tokens_per_second
    );
    println!("run log       {}", recipe.output.run_dir.display());
    Ok(())
}

/// The trainer settings of a recipe's `[train]` and `[output]` tables.
pub fn trainer_config(recipe: &Recipe, progress: bool) -> TrainerConfig {
    let t = &recipe.train;
    TrainerConfig {
        epochs: t.epochs,
        optimizer: AdamWConfig {
            lr: t.lr,
            weight_decay: t.weight_decay,
            ..Default::default()
        },
        schedule: t.schedule.clone(),
        max_grad_norm: t.max_grad_norm,
        grad_accumulation: t.grad_accumulation,
        early_stopping_patience: t.early_stopping_patience,
        log_every: t.log_every,
        run_dir: recipe.output.run_dir.clone(),
        progress,
    }
}

/// Tokenises prompt tuning's init text (special tokens included, as peft does) when the recipe
/// asks for text initialisation and gives no ids.
fn fill_prompt_token_ids(c: &mut PromptTuningConfig, aligner: &peft_data::Aligner) -> Result<()> {
    use peft_core::methods::prompt::PromptInit;
    if c.prompt_tuning_init != PromptInit::Text || c.init_token_ids.is_some() {
        return Ok(());
    }
    let text = c
        .prompt_tuning_init_text
        .as_deref()
        .context("adapter.prompt_tuning_init_text: text initialisation needs the text")?;
    let encoding = aligner
        .tokenizer()
        .encode(text, true)
        .map_err(|e| anyhow::anyhow!("adapter.prompt_tuning_init_text: {e}"))?;
    c.init_token_ids = Some(encoding.get_ids().to_vec());
    Ok(())
}
