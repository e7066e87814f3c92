//! Batch planning and padding.

use peft_data::{Batcher, Collator, Encoded, IGNORE_INDEX};

/// Pseudo-random lengths in 3..=60 without an RNG dependency in the test.
fn lengths(n: usize) -> Vec<usize> {
    (0..n).map(|i| 3 + (i * 7919 + i * i * 31) % 58).collect()
}

fn assert_each_index_once(batches: &[Vec<usize>], n: usize) {
    let mut seen = vec![0usize; n];
    for &i in batches.iter().flatten() {
        seen[i] += 1;
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "indices not covered exactly once"
    );
}

#[test]
fn every_index_exactly_once() {
    for (n, bs) in [(0, 4), (1, 4), (7, 3), (100, 8), (1001, 16), (5000, 32)] {
        let b = Batcher::new(lengths(n), bs, 3).unwrap();
        for epoch in 0..3 {
            let batches = b.epoch_batches(epoch);
            assert_each_index_once(&batches, n);
            assert_eq!(batches.len(), b.num_batches(), "n={n} bs={bs}");
            assert!(batches.iter().all(|x| !x.is_empty() && x.len() <= bs));
        }
        assert_each_index_once(&b.sequential(), n);
    }
}

#[test]
fn deterministic_given_seed_and_epochs_differ() {
    let b = Batcher::new(lengths(2000), 16, 42).unwrap();
    let again = Batcher::new(lengths(2000), 16, 42).unwrap();
    assert_eq!(b.epoch_batches(0), again.epoch_batches(0));
    assert_eq!(b.epoch_batches(5), again.epoch_batches(5));
    assert_ne!(b.epoch_batches(0), b.epoch_batches(1));
    let other_seed = Batcher::new(lengths(2000), 16, 7).unwrap();
    assert_ne!(b.epoch_batches(0), other_seed.epoch_batches(0));
    assert_eq!(b.sequential(), again.sequential());
}

#[test]
fn bucketing_reduces_padding() {
    let lens = lengths(4000);
    let padding = |batches: &[Vec<usize>]| -> usize {
        batches
            .iter()
            .map(|x| {
                let max = x.iter().map(|&i| lens[i]).max().unwrap();
                x.iter().map(|&i| max - lens[i]).sum::<usize>()
            })
            .sum()
    };
    let bucketed = Batcher::new(lens.clone(), 32, 1).unwrap();
    let random = bucketed.clone().with_bucket_factor(1).unwrap();
    let (pb, pr) = (
        padding(&bucketed.epoch_batches(0)),
        padding(&random.epoch_batches(0)),
    );
    assert!(pb * 5 < pr, "bucketed padding {pb} vs random {pr}");
}

#[test]
fn sequential_is_sorted_longest_first_and_restorable() {
    let lens = lengths(103);
    let b = Batcher::new(lens.clone(), 10, 0).unwrap();
    let batches = b.sequential();
    let flat: Vec<usize> = batches.concat();
    assert!(flat.windows(2).all(|w| lens[w[0]] >= lens[w[1]]));
    assert_eq!(batches.len(), 11);
    // Put per-item results back in input order.
    let mut restored = vec![usize::MAX; lens.len()];
    for &i in &flat {
        restored[i] = lens[i];
    }
    assert_eq!(restored, lens);
}

fn item(len: usize, tag: u32) -> Encoded {
    Encoded {
        input_ids: vec![tag; len],
        token_type_ids: vec![0; len],
        labels: vec![tag as i64; len],
        word_ids: vec![None; len],
        num_words: len,
        truncated_words: 0,
    }
}

#[test]
fn padding_widths_follow_longest_in_batch() {
    let items: Vec<Encoded> = [3, 7, 5, 2].iter().map(|&n| item(n, n as u32)).collect();
    let c = Collator::new(99);
    let batch = c.collate(&items, &[0, 3]).unwrap();
    assert_eq!((batch.batch_size, batch.seq_len), (2, 3));
    assert_eq!(batch.input_ids, [3, 3, 3, 2, 2, 99]);
    assert_eq!(batch.attention_mask, [1, 1, 1, 1, 1, 0]);
    assert_eq!(batch.labels, [3, 3, 3, 2, 2, IGNORE_INDEX]);
    assert_eq!(batch.token_type_ids, [0; 6]);
    assert_eq!(batch.indices, [0, 3]);
    assert_eq!(batch.num_tokens(), 5);

    let batch = c.collate(&items, &[2, 1, 0]).unwrap();
    assert_eq!(batch.seq_len, 7);
    assert_eq!(batch.input_ids.len(), 21);
    assert_eq!(
        &batch.attention_mask[batch.row_range(0)],
        [1, 1, 1, 1, 1, 0, 0]
    );
    assert_eq!(&batch.input_ids[batch.row_range(1)], [7; 7]);

    let c8 = Collator {
        pad_id: 0,
        pad_to_multiple_of: Some(8),
    };
    let batch = c8.collate(&items, &[1, 3]).unwrap();
    assert_eq!(batch.seq_len, 8);
    assert_eq!(batch.labels[7], IGNORE_INDEX);

    let empty = c.collate(&items, &[]).unwrap();
    assert_eq!(
        (empty.batch_size, empty.seq_len, empty.input_ids.len()),
        (0, 0, 0)
    );
}
