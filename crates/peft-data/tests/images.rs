//! Image sources: IDX files, image folders and CSV lists, with their errors.

mod images_common;

use std::path::Path;

use images_common::{gzip, idx_bytes, write_gray, write_idx_pair, write_rgb};
use peft_data::image::{
    read_idx, read_idx_dir, read_image_csv, read_image_folder, read_image_folder_splits,
    CsvColumns, ImageSource, FASHION_MNIST_CLASSES,
};
use peft_data::DataError;

fn err_text<T: std::fmt::Debug>(r: Result<T, DataError>) -> String {
    r.unwrap_err().to_string()
}

// ---------------------------------------------------------------- IDX

#[test]
fn idx_reads_raw_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    for gz in [false, true] {
        let sub = dir.path().join(if gz { "gz" } else { "raw" });
        std::fs::create_dir_all(&sub).unwrap();
        let (images, labels) = write_idx_pair(&sub, "train", 12, 3, 4, 10, gz);
        let data = read_idx(&images, &labels, None).unwrap();
        assert_eq!(data.len(), 12);
        assert_eq!(data.classes()[..3], ["0", "1", "2"]);
        assert_eq!(data.classes().len(), 10);
        assert_eq!(data.labels(), (0..12).map(|i| i % 10).collect::<Vec<u32>>());
        let img = data.load(5).unwrap();
        assert_eq!((img.width(), img.height(), img.channels()), (4, 3, 1));
        assert!(img.data().iter().all(|&p| p == 5));
        assert_eq!(data.items()[5].source, ImageSource::Raw(5));
        assert!(data.describe(5).ends_with("[#5]"));
        let named = read_idx(&images, &labels, Some(&FASHION_MNIST_CLASSES)).unwrap();
        assert_eq!(named.classes()[9], "Ankle boot");
    }
}

#[test]
fn idx_reads_train_and_test_from_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_pair(dir.path(), "train", 20, 2, 2, 10, true);
    write_idx_pair(dir.path(), "t10k", 10, 2, 2, 10, false);
    let splits = read_idx_dir(dir.path(), None).unwrap();
    assert_eq!(splits.train.len(), 20);
    assert_eq!(splits.test.as_ref().unwrap().len(), 10);
    assert!(splits.valid.is_none());
    let splits = splits.with_valid_fraction(0.5, 3).unwrap();
    assert_eq!(
        (splits.train.len(), splits.valid.as_ref().unwrap().len()),
        (10, 10)
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(err_text(read_idx_dir(empty.path(), None)).contains("train-"));
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn idx_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good_images = {
        let mut b = idx_bytes(&[2, 2, 2], &[0; 8]);
        b[3] = 3;
        b
    };
    let good_labels = idx_bytes(&[2], &[1, 2]);
    let images = write(d, "img", &good_images);
    let labels = write(d, "lab", &good_labels);
    assert_eq!(read_idx(&images, &labels, None).unwrap().len(), 2);

    // Wrong magic: labels given as images.
    let e = err_text(read_idx(&labels, &labels, None));
    assert!(
        e.contains("lab") && e.contains("magic number 0x00000801, expected 0x00000803"),
        "{e}"
    );
    // Truncated data, raw and gzipped.
    let short = write(d, "short", &good_images[..good_images.len() - 3]);
    let e = err_text(read_idx(&short, &labels, None));
    assert!(e.contains("short") && e.contains("truncated"), "{e}");
    let gz_cut = gzip(&good_images);
    let gz_cut = write(d, "cut.gz", &gz_cut[..gz_cut.len() / 2]);
    let e = err_text(read_idx(&gz_cut, &labels, None));
    assert!(e.contains("cut.gz") && e.contains("gzip"), "{e}");
    let header_only = write(d, "tiny", &[0, 0, 8]);
    assert!(err_text(read_idx(&header_only, &labels, None)).contains("tiny"));
    // Trailing bytes.
    let mut long = good_images.clone();
    long.push(0);
    let long = write(d, "long", &long);
    assert!(err_text(read_idx(&long, &labels, None)).contains("1 bytes after"));
    // Label out of range, count mismatch.
    let bad_label = write(d, "badlab", &idx_bytes(&[2], &[1, 10]));
    let e = err_text(read_idx(&images, &bad_label, None));
    assert!(
        e.contains("badlab") && e.contains("label 10 of item 1"),
        "{e}"
    );
    let few = write(d, "few", &idx_bytes(&[1], &[1]));
    let e = err_text(read_idx(&images, &few, None));
    assert!(e.contains("few") && e.contains("1 labels but"), "{e}");
    // Missing file.
    assert!(err_text(read_idx(d.join("nope"), &labels, None)).contains("nope"));
}

// ---------------------------------------------------------------- image folder

#[test]
fn image_folder_lists_classes_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_rgb(&root.join("cat/b.png"), 5, 4, 1);
    write_rgb(&root.join("cat/a.JPG"), 5, 4, 2);
    write_rgb(&root.join("ant/nested/x.bmp"), 3, 3, 3);
    write_gray(&root.join("bee/g.png"), 2, 6, 9);
    std::fs::write(root.join("bee/notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("bee/.hidden.png"), "junk").unwrap();
    std::fs::write(root.join("README"), "top-level file").unwrap();
    let data = read_image_folder(root).unwrap();
    assert_eq!(data.classes(), ["ant", "bee", "cat"]);
    assert_eq!(data.labels(), [0, 1, 2, 2]);
    let files: Vec<String> = (0..4).map(|i| data.describe(i)).collect();
    assert!(
        files[2].ends_with("a.JPG") && files[3].ends_with("b.png"),
        "{files:?}"
    );
    // Lazily decoded, any format.
    let bmp = data.load(0).unwrap();
    assert_eq!((bmp.width(), bmp.height(), bmp.channels()), (3, 3, 3));
    assert_eq!(data.load(1).unwrap().channels(), 1);
    // Same layout under train/ val/ test/.
    let splits = read_image_folder_splits(root).unwrap();
    assert!(splits.valid.is_none() && splits.test.is_none());
    assert_eq!(splits.train.len(), 4);
}

#[test]
fn image_folder_splits_share_the_training_classes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (split, class, n) in [
        ("train", "a", 2),
        ("train", "b", 1),
        ("val", "b", 1),
        ("test", "a", 3),
    ] {
        for i in 0..n {
            write_rgb(&root.join(format!("{split}/{class}/{i}.png")), 4, 4, i);
        }
    }
    let splits = read_image_folder_splits(root).unwrap();
    assert_eq!(splits.classes(), ["a", "b"]);
    assert_eq!(splits.train.labels(), [0, 0, 1]);
    assert_eq!(splits.valid.as_ref().unwrap().labels(), [1]);
    assert_eq!(splits.test.as_ref().unwrap().labels(), [0, 0, 0]);
    // A class only in test.
    write_rgb(&root.join("test/zebra/0.png"), 4, 4, 0);
    let e = err_text(read_image_folder_splits(root));
    assert!(
        e.contains("zebra") && e.contains("does not occur in the training split"),
        "{e}"
    );
    std::fs::remove_dir_all(root.join("test/zebra")).unwrap();
    // A stray folder beside train/.
    std::fs::create_dir_all(root.join("extra")).unwrap();
    assert!(err_text(read_image_folder_splits(root)).contains("`extra/`"));
}

#[test]
fn image_folder_errors_name_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let e = err_text(read_image_folder(root));
    assert!(
        e.contains(&root.display().to_string()) && e.contains("no class folders"),
        "{e}"
    );
    write_rgb(&root.join("full/0.png"), 2, 2, 0);
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("empty/readme.txt"), "x").unwrap();
    let e = err_text(read_image_folder(root));
    assert!(e.contains("class folder") && e.contains("empty"), "{e}");
    assert!(matches!(
        read_image_folder(root),
        Err(DataError::EmptyClassFolder { .. })
    ));
    assert!(err_text(read_image_folder(root.join("missing"))).contains("missing"));
}

// ---------------------------------------------------------------- CSV

#[test]
fn csv_reads_paths_labels_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for i in 0..5 {
        write_rgb(&d.join(format!("img/{i}.png")), 3, 3, i);
    }
    std::fs::write(
        d.join("data.csv"),
        "\u{feff}id,file,class,split\n1,img/0.png,dog,train\n2,\"img/1.png\",cat,train\n\n\
         3,img/2.png,\"dog\",val\n4,img/3.png,cat,test\r\n5,img/4.png,dog,train\n",
    )
    .unwrap();
    let columns = CsvColumns {
        path: "file".into(),
        label: "class".into(),
        ..CsvColumns::default()
    };
    let splits = read_image_csv(d.join("data.csv"), &columns).unwrap();
    assert_eq!(splits.classes(), ["cat", "dog"]);
    assert_eq!(splits.train.labels(), [1, 0, 1]);
    assert_eq!(splits.valid.as_ref().unwrap().labels(), [1]);
    assert_eq!(splits.test.as_ref().unwrap().labels(), [0]);
    assert_eq!(
        splits.train.items()[1].source,
        ImageSource::File(d.join("img/1.png"))
    );
    assert_eq!(splits.train.load(2).unwrap().width(), 3);

    // Without a split column everything is training.
    std::fs::write(
        d.join("plain.csv"),
        "path,label\nimg/0.png,x\nimg/1.png,y\n",
    )
    .unwrap();
    let splits = read_image_csv(d.join("plain.csv"), &CsvColumns::default()).unwrap();
    assert_eq!((splits.train.len(), splits.valid.is_none()), (2, true));
}

#[test]
fn csv_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_rgb(&d.join("a.png"), 2, 2, 0);
    let cases = [
        (
            "nocol.csv",
            "file,label\na.png,x\n",
            "nocol.csv:1: no `path` column",
        ),
        (
            "fields.csv",
            "path,label\na.png,x\na.png\n",
            "fields.csv:3: 1 fields, the header has 2",
        ),
        (
            "missing.csv",
            "path,label\na.png,x\nb.png,y\n",
            "missing.csv:3: image file",
        ),
        (
            "empty.csv",
            "path,label\na.png,\n",
            "empty.csv:2: empty `label` field",
        ),
        (
            "quote.csv",
            "path,label\n\"a.png,x\n",
            "quote.csv:2: unterminated quote",
        ),
        (
            "split.csv",
            "path,label,split\na.png,x,dev\n",
            "split.csv:2: unknown split `dev`",
        ),
        (
            "novel.csv",
            "path,label,split\na.png,x,train\na.png,y,test\n",
            "line 3",
        ),
        ("header.csv", "", "header.csv:1: no header row"),
        (
            "rows.csv",
            "path,label\n",
            "rows.csv:1: no rows after the header",
        ),
        (
            "notrain.csv",
            "path,label,split\na.png,x,test\n",
            "notrain.csv:1: no training rows",
        ),
    ];
    for (name, text, expect) in cases {
        std::fs::write(d.join(name), text).unwrap();
        let e = err_text(read_image_csv(d.join(name), &CsvColumns::default()));
        assert!(e.contains(expect), "{name}: {e}");
    }
    let e = err_text(read_image_csv(d.join("novel.csv"), &CsvColumns::default()));
    assert!(e.contains("`y`") && e.contains("known labels: x"), "{e}");
}
