//! The trainer loop on a toy least-squares task: loss falls, accumulation equals a larger batch,
//! the best weights are restored, early stopping stops, and the run folder is written.

use candle_core::{Device, Tensor, Var};
use peft_train::optim::AdamWConfig;
use peft_train::{Evaluation, ScheduleConfig, Task, Trainer, TrainerConfig};

/// Fit `w` so that `x·w ≈ y` on four fixed samples.
struct LeastSquares {
    w: Var,
    x: Tensor,
    y: Tensor,
    batches: Vec<Vec<usize>>,
}

impl LeastSquares {
    fn new(batches: Vec<Vec<usize>>) -> Self {
        let dev = Device::Cpu;
        Self {
            w: Var::new(&[0.0f32, 0.0], &dev).unwrap(),
            x: Tensor::new(&[[1.0f32, 2.0], [0.5, -1.0], [2.0, 0.0], [-1.0, 1.0]], &dev).unwrap(),
            y: Tensor::new(&[3.0f32, -0.5, 2.0, 0.0], &dev).unwrap(),
            batches,
        }
    }

    fn mse(&self, rows: &[usize]) -> candle_core::Result<Tensor> {
        let idx = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        let pred = self
            .x
            .index_select(&idx, 0)?
            .matmul(&self.w.as_tensor().unsqueeze(1)?)?
            .squeeze(1)?;
        (pred - self.y.index_select(&idx, 0)?)?.sqr()?.mean_all()
    }
}

impl Task for LeastSquares {
    fn epoch_batches(&self, _epoch: usize) -> Vec<Vec<usize>> {
        self.batches.clone()
    }
    fn loss(&self, batch: &[usize], _train: bool) -> peft_train::Result<(Tensor, usize)> {
        Ok((self.mse(batch).unwrap(), batch.len()))
    }
    fn evaluate(&self) -> peft_train::Result<Evaluation> {
        let loss = self.mse(&[0, 1, 2, 3]).unwrap().to_scalar::<f32>().unwrap() as f64;
        Ok(Evaluation {
            score: -loss,
            loss: Some(loss),
            details: serde_json::json!({}),
        })
    }
}

fn config(
    dir: &std::path::Path,
    epochs: usize,
    lr: f64,
    accumulation: usize,
    patience: Option<usize>,
) -> TrainerConfig {
    TrainerConfig {
        epochs,
        optimizer: AdamWConfig {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
        schedule: ScheduleConfig::Constant {},
        max_grad_norm: Some(10.0),
        grad_accumulation: accumulation,
        early_stopping_patience: patience,
        log_every: 1,
        run_dir: dir.to_path_buf(),
        progress: false,
    }
}

fn w(task: &LeastSquares) -> Vec<f32> {
    task.w.as_tensor().to_vec1().unwrap()
}

#[test]
fn loss_falls_and_the_run_folder_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let task = LeastSquares::new(vec![vec![0, 1], vec![2, 3]]);
    let before = task.evaluate().unwrap().loss.unwrap();
    let trainer = Trainer::new(
        config(dir.path(), 30, 0.1, 1, None),
        vec![("w".into(), task.w.clone())],
    )
    .unwrap();
    let summary = trainer.fit(&task).unwrap();
    let after = task.evaluate().unwrap().loss.unwrap();
    assert!(after < before / 10.0, "loss {before} -> {after}");
    assert_eq!(summary.steps, 60);
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"eval\"")).count(), 30);
    assert!(std::fs::read_to_string(dir.path().join("curves.svg"))
        .unwrap()
        .starts_with("<svg"));
    let best =
        candle_core::safetensors::load(dir.path().join("best.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        best["w"].to_vec1::<f32>().unwrap(),
        w(&task),
        "the best epoch's weights are kept"
    );
}

#[test]
fn accumulating_two_halves_equals_one_full_batch() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let halves = LeastSquares::new(vec![vec![0, 1], vec![2, 3]]);
    Trainer::new(
        config(d1.path(), 3, 0.05, 2, None),
        vec![("w".into(), halves.w.clone())],
    )
    .unwrap()
    .fit(&halves)
    .unwrap();
    let full = LeastSquares::new(vec![vec![0, 1, 2, 3]]);
    Trainer::new(
        config(d2.path(), 3, 0.05, 1, None),
        vec![("w".into(), full.w.clone())],
    )
    .unwrap()
    .fit(&full)
    .unwrap();
    for (a, b) in w(&halves).iter().zip(w(&full)) {
        assert!((a - b).abs() < 1e-6, "{:?} vs {:?}", w(&halves), w(&full));
    }
}

/// The least-squares task with scripted validation scores, recording `w` at each evaluation.
struct Scripted {
    inner: LeastSquares,
    scores: Vec<f64>,
    seen: std::cell::RefCell<Vec<Vec<f32>>>,
}

impl Task for Scripted {
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        self.inner.epoch_batches(epoch)
    }
    fn loss(&self, batch: &[usize], train: bool) -> peft_train::Result<(Tensor, usize)> {
        self.inner.loss(batch, train)
    }
    fn evaluate(&self) -> peft_train::Result<Evaluation> {
        let mut seen = self.seen.borrow_mut();
        seen.push(w(&self.inner));
        Ok(Evaluation {
            score: self.scores[seen.len() - 1],
            loss: None,
            details: serde_json::json!({}),
        })
    }
}

#[test]
fn early_stopping_stops_and_restores_the_best_weights() {
    let dir = tempfile::tempdir().unwrap();
    let task = Scripted {
        inner: LeastSquares::new(vec![vec![0, 1, 2, 3]]),
        scores: vec![0.5, 0.7, 0.6, 0.65, 0.9, 0.9],
        seen: Default::default(),
    };
    let trainer = Trainer::new(
        config(dir.path(), 6, 0.1, 1, Some(2)),
        vec![("w".into(), task.inner.w.clone())],
    )
    .unwrap();
    let summary = trainer.fit(&task).unwrap();
    assert_eq!(
        (summary.epochs_run, summary.best_epoch),
        (4, 2),
        "two epochs without improvement after the best"
    );
    let seen = task.seen.borrow();
    assert_ne!(seen[1], seen[3]);
    assert_eq!(
        w(&task.inner),
        seen[1],
        "the weights of epoch 2 are restored"
    );
}

/// The least-squares task plus a BatchNorm that sees each training batch, with scripted scores.
struct WithBatchNorm {
    inner: Scripted,
    bn: std::sync::Arc<peft_core::BatchNorm2d>,
    /// The running mean at each evaluation.
    means: std::cell::RefCell<Vec<Vec<f32>>>,
}

impl Task for WithBatchNorm {
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        self.inner.epoch_batches(epoch)
    }
    fn loss(&self, batch: &[usize], train: bool) -> peft_train::Result<(Tensor, usize)> {
        // The same four rows of two channels every step: the running averages move toward
        // their statistics (momentum 0.1), so each epoch ends with different ones.
        self.bn.forward(&self.inner.inner.x, train).unwrap();
        self.inner.loss(batch, train)
    }
    fn evaluate(&self) -> peft_train::Result<Evaluation> {
        let (mean, _) = self.bn.running_stats();
        self.means.borrow_mut().push(mean.to_vec1().unwrap());
        self.inner.evaluate()
    }
    fn batch_norms(&self) -> Vec<std::sync::Arc<peft_core::BatchNorm2d>> {
        vec![self.bn.clone()]
    }
}

#[test]
fn batch_norm_statistics_are_restored_with_the_best_weights() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let bn = peft_core::BatchNorm2d::new(
        "bn".into(),
        Tensor::ones(2, candle_core::DType::F32, &dev).unwrap(),
        Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap(),
        Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap(),
        Tensor::ones(2, candle_core::DType::F32, &dev).unwrap(),
        1e-5,
        0.1,
        peft_core::BatchNormMode::Update,
    );
    let task = WithBatchNorm {
        inner: Scripted {
            inner: LeastSquares::new(vec![vec![0, 1], vec![2, 3]]),
            scores: vec![0.5, 0.9, 0.6],
            seen: Default::default(),
        },
        bn: std::sync::Arc::new(bn),
        means: Default::default(),
    };
    let trainer = Trainer::new(
        config(dir.path(), 3, 0.1, 1, None),
        vec![("w".into(), task.inner.inner.w.clone())],
    )
    .unwrap();
    let summary = trainer.fit(&task).unwrap();
    assert_eq!(summary.best_epoch, 2);
    let means = task.means.borrow();
    assert_ne!(
        means[1], means[2],
        "the statistics moved after the best epoch"
    );
    let (mean, _) = task.bn.running_stats();
    assert_eq!(
        mean.to_vec1::<f32>().unwrap(),
        means[1],
        "epoch 2's statistics are back"
    );
    assert_eq!(
        task.bn.tracked_batches(),
        4,
        "two batches per epoch up to the best"
    );
}
