//! End-to-end tests of the `peft-rs` binary on a tiny random BERT and a tiny CoNLL task
//! (tests/fixtures/tiny-bert, tests/fixtures/tiny-conll, made by tests/fixtures/gen_tiny.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use tempfile::TempDir;

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    dir.canonicalize().unwrap()
}

fn tiny_bert() -> PathBuf {
    fixtures().join("tiny-bert")
}

fn tiny_conll() -> PathBuf {
    fixtures().join("tiny-conll")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs `peft-rs` with `args`.
fn run(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peft-rs"));
    cmd.args(args)
        .env("PEFT_RS_LOG", "warn")
        .output()
        .expect("running peft-rs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `peft-rs` and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "peft-rs {args:?} failed:\n{}",
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Runs `peft-rs` and expects failure with every needle in stderr.
fn fails(args: &[&str], needles: &[&str]) {
    let o = run(args);
    assert!(
        !o.status.success(),
        "peft-rs {args:?} should fail:\n{}",
        text(&o.stdout)
    );
    let err = text(&o.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
    }
}

/// Writes `dir/recipe.toml` for LoRA r=4 on query/value of `model`, data from `data`
/// ({train,valid,test}.txt), output to `dir/adapter` and `dir/run`; `edit` changes the text.
fn write_recipe(dir: &Path, model: &Path, data: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let (model, data, out) = (s(model), s(data), s(dir));
    let text = format!(
        r#"[model]
name = '{model}'
[task]
kind = "token_classification"
max_length = 32
[data]
train = '{data}/train.txt'
valid = '{data}/valid.txt'
test = '{data}/test.txt'
tag_scheme = "iob2"
[adapter]
method = "lora"
r = 4
lora_alpha = 8
lora_dropout = 0.0
target_modules = ["query", "value"]
[train]
epochs = 4
batch_size = 8
lr = 5e-2
seed = 7
log_every = 2
[output]
adapter_dir = '{out}/adapter'
run_dir = '{out}/run'
"#
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

/// Trains the default recipe (with `--set` overrides) into a new tempdir.
fn train(sets: &[&str]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), &tiny_bert(), &tiny_conll(), |t| t);
    let mut args = vec!["train", s(&recipe), "--quiet"];
    for set in sets {
        args.extend(["--set", set]);
    }
    ok(&args);
    dir
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn read_json(path: &Path) -> Value {
    parse(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Overall entity F1 of `eval --split split --json`.
fn f1(adapter: &Path, split: &str) -> f64 {
    let out = ok(&["eval", "--adapter", s(adapter), "--split", split, "--json"]);
    let f1 = parse(&out)["overall"]["f1"].as_f64().expect("overall.f1");
    assert!((0.0..=1.0).contains(&f1), "f1 {f1}");
    f1
}

/// How many records of metrics.jsonl have this event.
fn events(run_dir: &Path, event: &str) -> usize {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(parse)
        .filter(|r| r["event"] == event)
        .count()
}

fn lora_key(layer: usize, module: &str, ab: &str) -> String {
    format!("base_model.model.bert.encoder.layer.{layer}.attention.self.{module}.lora_{ab}.weight")
}

#[test]
fn train_inspect_eval_predict_merge() {
    let dir = train(&[]);
    let (adapter, run_dir) = (dir.path().join("adapter"), dir.path().join("run"));
    let config = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "TOKEN_CLS");
    assert_eq!(config["modules_to_save"], json!(["classifier"]));
    assert!(adapter.join("peft_rs.json").is_file());
    let tensors = load(&adapter.join("adapter_model.safetensors"));
    for (layer, module) in [(0, "query"), (0, "value"), (1, "query"), (1, "value")] {
        assert_eq!(tensors[&lora_key(layer, module, "A")].dims(), [4, 32]);
        assert_eq!(tensors[&lora_key(layer, module, "B")].dims(), [32, 4]);
    }
    let head_key = |p: &str| format!("base_model.model.classifier.{p}");
    assert_eq!(tensors[&head_key("weight")].dims(), [7, 32]);
    assert_eq!(tensors[&head_key("bias")].dims(), [7]);
    assert_eq!(tensors.len(), 10, "{:?}", tensors.keys());
    assert!(events(&run_dir, "train") > 0 && events(&run_dir, "eval") == 4);
    assert!(run_dir.join("curves.svg").is_file());

    // 2 layers x (query, value) x (A 4x32 + B 32x4), plus the classifier 7x32 + 7 (7 labels).
    let (lora, head) = (2 * 2 * (4 * 32 + 32 * 4), 7 * 32 + 7);
    let report = parse(&ok(&["inspect", s(&adapter), "--json"]));
    assert_eq!(report["settings"]["r"], 4);
    assert_eq!(report["peft_type"], "LORA");
    assert_eq!(report["adapter_parameters"], lora);
    assert_eq!(report["trainable_parameters"], lora + head);
    let summary = read_json(&run_dir.join("summary.json"));
    assert_eq!(summary["trainable_parameters"], lora + head);

    // Quality: the trained adapter against a near-untrained one (one epoch at lr 1e-9) on the
    // training split (robust here: about 0.6 against under 0.15 over seeds 1, 2, 3, 7, 42).
    let test_f1 = f1(&adapter, "test");
    let untrained = train(&["train.epochs=1", "train.lr=1e-9"]);
    let trained = f1(&adapter, "train");
    let baseline = f1(&untrained.path().join("adapter"), "train");
    assert!(
        trained > baseline + 0.3,
        "train F1 {trained} vs untrained {baseline} (test F1 {test_f1})"
    );

    let sentence = "john smith lives in paris .";
    let out = ok(&["predict", "--adapter", s(&adapter), "--json", sentence]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let p = parse(&out);
    let len = |k: &str| p[k].as_array().map(Vec::len);
    assert_eq!((len("words"), len("tags")), (Some(6), Some(6)), "{p}");

    let merged = dir.path().join("merged");
    ok(&["merge", "--adapter", s(&adapter), "--out", s(&merged)]);
    let config = read_json(&merged.join("config.json"));
    let architectures = json!(["BertForTokenClassification"]);
    assert_eq!(config["architectures"], architectures);
    assert_eq!(config["id2label"].as_object().unwrap().len(), 7);
    let m = load(&merged.join("model.safetensors"));
    assert!(
        m.contains_key("classifier.weight") && !m.keys().any(|k| k.contains("lora_")),
        "{:?}",
        m.keys()
    );
    // merged = base + (lora_alpha / r) B A, with alpha / r = 8 / 4.
    let base = load(&tiny_bert().join("model.safetensors"));
    let ba = tensors[&lora_key(0, "query", "B")]
        .matmul(&tensors[&lora_key(0, "query", "A")])
        .unwrap();
    let ba_max = ba.abs().and_then(|t| t.max_all()?.to_scalar::<f32>());
    assert!(
        ba_max.unwrap() > 1e-4,
        "B A is zero: the check below would be empty"
    );
    let expected =
        (&base["encoder.layer.0.attention.self.query.weight"] + (ba * 2.0).unwrap()).unwrap();
    let merged_query = &m["bert.encoder.layer.0.attention.self.query.weight"];
    let diff = (merged_query - expected).and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>());
    let diff = diff.unwrap();
    assert!(diff < 1e-5, "merged query differs by {diff}");
}

#[test]
fn set_override_changes_the_recipe() {
    let dir = train(&["train.epochs=1"]);
    assert_eq!(events(&dir.path().join("run"), "eval"), 1);
}

/// A training run expected to fail: the tiny model and data, possibly edited copies of them.
struct Bad {
    dir: TempDir,
    model: PathBuf,
    data: PathBuf,
}

fn bad() -> Bad {
    let dir = tempfile::tempdir().unwrap();
    Bad {
        dir,
        model: tiny_bert(),
        data: tiny_conll(),
    }
}

impl Bad {
    /// Uses a copy of the data whose `file` is changed by `edit`.
    fn data_file(mut self, file: &str, edit: impl Fn(String) -> String) -> Self {
        self.data = copy_dir(&tiny_conll(), &self.dir.path().join("data"));
        let text = std::fs::read_to_string(self.data.join(file)).unwrap();
        std::fs::write(self.data.join(file), edit(text)).unwrap();
        self
    }

    /// Uses a copy of the model without `drop`, or with the first `keep` of its weight bytes.
    fn model_files(mut self, drop: Option<&str>, keep: f64) -> Self {
        self.model = copy_dir(&tiny_bert(), &self.dir.path().join("model"));
        let weights = self.model.join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        bytes.truncate((bytes.len() as f64 * keep) as usize);
        std::fs::write(&weights, bytes).unwrap();
        if let Some(f) = drop {
            std::fs::remove_file(self.model.join(f)).unwrap();
        }
        self
    }

    /// Trains the recipe changed by `edit`; expects a failure naming every needle, and no adapter folder.
    fn fails(&self, edit: impl Fn(String) -> String, needles: &[&str]) {
        let recipe = write_recipe(self.dir.path(), &self.model, &self.data, edit);
        fails(&["train", s(&recipe), "--quiet"], needles);
        assert!(
            !self.dir.path().join("adapter").exists(),
            "the adapter folder was created"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let name = entry.unwrap().file_name();
        std::fs::copy(from.join(&name), to.join(&name)).unwrap();
    }
    to.to_path_buf()
}

#[test]
fn misspelt_recipe_key_lists_the_valid_ones() {
    bad().fails(
        |t| t.replace("epochs = 4", "epoch = 4"),
        &["recipe.toml", "`epoch`", "`epochs`"],
    );
}

#[test]
fn unknown_adapter_method_lists_lora() {
    bad().fails(
        |t| t.replace("\"lora\"", "\"lorra\""),
        &["`lorra`", "`lora`"],
    );
}

#[test]
fn missing_train_file_is_named() {
    bad().fails(
        |t| t.replace("train.txt", "no-such.txt"),
        &["cannot read", "tiny-conll/no-such.txt"],
    );
}

#[test]
fn malformed_conll_line_names_file_and_line() {
    // Line 3 is the first token line of train.txt; leave it one column.
    let b = bad().data_file("train.txt", |t| {
        t.replacen("jack NNP B-NP B-PER", "jack", 1)
    });
    b.fails(
        |t| t,
        &[
            &format!("{}:3", b.data.join("train.txt").display()),
            "columns",
        ],
    );
}

#[test]
fn label_absent_from_train_is_named() {
    let b = bad().data_file("valid.txt", |t| t.replacen("B-LOC", "B-MISC", 1));
    b.fails(|t| t, &["valid", "`B-MISC`", "line 7", "training split"]);
}

#[test]
fn empty_training_file_is_refused() {
    let b = bad().data_file("train.txt", |_| String::new());
    b.fails(|t| t, &[s(&b.data.join("train.txt")), "no sentences"]);
}

#[test]
fn model_folder_without_config_is_refused() {
    let b = bad().model_files(Some("config.json"), 1.0);
    b.fails(|t| t, &[s(&b.model), "config.json"]);
}

#[test]
fn model_folder_without_weights_is_refused() {
    let b = bad().model_files(Some("model.safetensors"), 1.0);
    b.fails(|t| t, &[s(&b.model), "no weights"]);
}

#[test]
fn truncated_model_weights_are_refused() {
    let b = bad().model_files(None, 0.5);
    b.fails(
        |t| t,
        &[
            s(&b.model.join("model.safetensors")),
            "not a valid safetensors file",
        ],
    );
}

#[test]
fn adapter_mismatches_are_named() {
    let dir = train(&["train.epochs=1"]);
    let copy = |name: &str| copy_dir(&dir.path().join("adapter"), &dir.path().join(name));

    let other_base = copy("fingerprint");
    let mut meta = read_json(&other_base.join("peft_rs.json"));
    meta["base_model_fingerprint"] = json!("sha256:0123456789abcdef");
    std::fs::write(other_base.join("peft_rs.json"), meta.to_string()).unwrap();
    fails(
        &["eval", "--adapter", s(&other_base), "--json"],
        &["different base model"],
    );

    let wrong_rank = copy("rank");
    let weights = wrong_rank.join("adapter_model.safetensors");
    let mut tensors = load(&weights);
    let key = lora_key(1, "value", "A");
    tensors.insert(
        key.clone(),
        Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    fails(
        &["eval", "--adapter", s(&wrong_rank), "--json"],
        &[&format!("`{key}`"), "[3, 32]", "[4, 32]"],
    );

    let loha = copy("loha");
    let mut config = read_json(&loha.join("adapter_config.json"));
    config["peft_type"] = json!("LOHA");
    std::fs::write(loha.join("adapter_config.json"), config.to_string()).unwrap();
    fails(&["inspect", s(&loha)], &["`LOHA`", "supported: LORA"]);
}

/// Every method trains from a recipe, saves, and evaluates again from its folder with the same
/// test F1 as the training run reported (the folder rebuilds the model exactly); mergeable
/// methods merge, the others refuse with a clear error.
#[test]
fn every_method_trains_saves_and_reloads_through_the_cli() {
    let methods: [(&str, &str, bool); 8] = [
        ("dora", "method = \"lora\"\nr = 4\nlora_alpha = 8\nuse_dora = true\ntarget_modules = [\"query\", \"value\"]\n", true),
        ("pissa", "method = \"lora\"\nr = 2\nlora_alpha = 2\ninit = \"pissa\"\ntarget_modules = [\"query\", \"value\"]\n", true),
        ("ia3", "method = \"ia3\"\ntarget_modules = [\"key\", \"value\", \"output.dense\"]\nfeedforward_modules = [\"output.dense\"]\n", true),
        ("houlsby", "method = \"bottleneck\"\nplacement = \"houlsby\"\nreduction_factor = 4\n", false),
        ("prefix", "method = \"prefix_tuning\"\nnum_virtual_tokens = 4\nprefix_projection = true\nencoder_hidden_size = 16\n", false),
        ("prompt", "method = \"prompt_tuning\"\nnum_virtual_tokens = 3\nprompt_tuning_init = \"text\"\nprompt_tuning_init_text = \"john lives in paris\"\n", false),
        ("bitfit", "", true),
        ("embedding", "method = \"lora\"\nr = 2\nlora_alpha = 4\ntarget_modules = [\"word_embeddings\", \"query\"]\n", true),
    ];
    for (name, adapter, mergeable) in methods {
        let dir = tempfile::tempdir().unwrap();
        let recipe = write_recipe(dir.path(), &tiny_bert(), &tiny_conll(), |t| {
            let start = t.find("[adapter]").unwrap();
            let end = t.find("[train]").unwrap();
            let section = if adapter.is_empty() {
                "[tuning]\nunfreeze = ['.*\\.bias']\n".to_string()
            } else {
                format!("[adapter]\n{adapter}")
            };
            format!("{}{section}{}", &t[..start], &t[end..]).replace("epochs = 4", "epochs = 2")
        });
        ok(&["train", s(&recipe), "--quiet"]);
        let adapter_dir = dir.path().join("adapter");
        let summary = read_json(&dir.path().join("run/summary.json"));
        let trained = summary["test"]["overall"]["f1"].as_f64().unwrap();
        let reloaded = f1(&adapter_dir, "test");
        assert!(
            (trained - reloaded).abs() < 1e-9,
            "{name}: test F1 {trained} after training, {reloaded} from the saved folder"
        );
        let report = parse(&ok(&["inspect", s(&adapter_dir), "--json"]));
        assert!(
            report["trainable_parameters"].as_u64().unwrap() > 0,
            "{name}"
        );
        let merged = dir.path().join("merged");
        if mergeable {
            ok(&["merge", "--adapter", s(&adapter_dir), "--out", s(&merged)]);
            assert!(merged.join("model.safetensors").is_file(), "{name}");
        } else {
            fails(
                &["merge", "--adapter", s(&adapter_dir), "--out", s(&merged)],
                &["cannot be merged"],
            );
            assert!(
                !merged.join("model.safetensors").exists(),
                "{name}: half-written merge"
            );
        }
    }
}
