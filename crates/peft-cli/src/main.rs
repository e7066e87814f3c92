//! `peft-rs`: parameter-efficient fine-tuning from TOML recipes. Thin over the libraries.

mod commands;
mod recipe;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Parameter-efficient fine-tuning (LoRA) of pretrained transformers, in Rust.
#[derive(Parser)]
#[command(name = "peft-rs", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an adapter from a recipe and write the adapter folder.
    Train {
        /// The recipe (TOML).
        recipe: PathBuf,
        /// Override a recipe value, e.g. `--set train.epochs=1` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Score an adapter on a split: entity precision, recall and F1 (NER), or accuracy per class
    /// (images).
    Eval {
        /// The adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// `test`, `valid` or `train` (the paths stored with the adapter), unless --data is given.
        #[arg(long, default_value = "test")]
        split: String,
        /// A CoNLL file to score instead of the stored split.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Base model id or folder, instead of the one in adapter_config.json.
        #[arg(long)]
        base: Option<String>,
        /// f32, or bf16: products with frozen weights on AMX tiles (bf16 operands, f32 sums).
        #[arg(long, default_value = "f32")]
        matmul_precision: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tag sentences with a NER adapter, or classify image files with an image adapter.
    Predict {
        /// The adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// Sentences (words are split at spaces and punctuation); stdin lines when none.
        text: Vec<String>,
        /// Base model id or folder, instead of the one in adapter_config.json.
        #[arg(long)]
        base: Option<String>,
        /// f32, or bf16: products with frozen weights on AMX tiles (bf16 operands, f32 sums).
        #[arg(long, default_value = "f32")]
        matmul_precision: String,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Describe an adapter folder: method, targets, rank, parameters, bytes, base model.
    Inspect {
        /// The adapter folder.
        adapter: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time training steps, inference and the adapter kernels on random-weight BERT shapes.
    Bench {
        /// Comma-separated suites: train, infer, kernels (kernels checks every op against the
        /// CPU first, then times the LoRA linear).
        #[arg(long, default_value = "train,infer")]
        suite: String,
        /// minilm (all-MiniLM-L6-v2 shape), bert-base, tiny, or mobilenet-v2 (torchvision's
        /// MobileNetV2, 10 classes).
        #[arg(long, default_value = "minilm")]
        model: String,
        /// Comma-separated training methods: full, lora-qv, lora-all, ia3, bottleneck
        /// [default: full,lora-qv,lora-all]; for mobilenet-v2 full, lora (every 1×1 conv), head
        /// [default: full,lora,head].
        #[arg(long)]
        methods: Option<String>,
        /// cpu or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, or bf16 (frozen weights and activations; trainable weights stay f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// f32, or bf16: products with frozen weights on AMX tiles (bf16 operands, f32 sums).
        #[arg(long, default_value = "f32")]
        matmul_precision: String,
        /// Sequences (images) per batch [default: 16; 64 for mobilenet-v2].
        #[arg(long)]
        batch: Option<usize>,
        /// Comma-separated sequence lengths (image sides for mobilenet-v2) [default: 128; 64
        /// for mobilenet-v2].
        #[arg(long)]
        seqs: Option<String>,
        /// Timed steps per case (the median is reported).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also time forward, backward and optimizer apart in training cases.
        #[arg(long)]
        phases: bool,
    },
    /// Fold an adapter into its base and write a plain checkpoint: Hugging Face for BERT, ViT and
    /// DINOv2 (loads in transformers without peft), a torchvision state dict for CNNs.
    Merge {
        /// The adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// The output folder (model.safetensors, config.json, and the base's tokenizer or
        /// preprocessor files).
        #[arg(long)]
        out: PathBuf,
        /// Base model id or folder, instead of the one in adapter_config.json.
        #[arg(long)]
        base: Option<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEFT_RS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    if !peft_core::device::keep_freed_cpu_buffers() {
        tracing::debug!("the allocator does not take mallopt settings; CPU buffers are not kept");
    }
    let result = match cli.command {
        Command::Train {
            recipe,
            overrides,
            quiet,
        } => commands::train::run(&recipe, &overrides, !quiet),
        Command::Eval {
            adapter,
            split,
            data,
            base,
            json,
            matmul_precision,
        } => commands::apply_matmul_precision(&matmul_precision, "--matmul-precision").and_then(
            |_| commands::eval::run(&adapter, &split, data.as_deref(), base.as_deref(), json),
        ),
        Command::Predict {
            adapter,
            text,
            base,
            json,
            matmul_precision,
        } => commands::apply_matmul_precision(&matmul_precision, "--matmul-precision")
            .and_then(|_| commands::predict::run(&adapter, &text, base.as_deref(), json)),
        Command::Inspect { adapter, json } => commands::inspect::run(&adapter, json),
        Command::Bench {
            suite,
            model,
            methods,
            device,
            dtype,
            matmul_precision,
            batch,
            seqs,
            steps,
            warmup,
            out,
            phases,
        } => commands::bench::run(&commands::bench::BenchArgs {
            suites: &suite,
            model: &model,
            methods: methods.as_deref(),
            device: &device,
            dtype: &dtype,
            matmul_precision: &matmul_precision,
            batch,
            seqs: seqs.as_deref(),
            steps,
            warmup,
            out: out.as_deref(),
            phases,
        }),
        Command::Merge { adapter, out, base } => {
            commands::merge::run(&adapter, &out, base.as_deref())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause shown once (a message that already quotes its source is
/// not followed by it again).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
    }
    out
}
