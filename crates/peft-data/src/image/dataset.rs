//! Labelled image datasets: items (a source and a class index) with class names.

use std::path::PathBuf;
use std::sync::Arc;

use super::bitmap::Bitmap;
use crate::error::{DataError, Result};

/// Same-sized 8-bit images held in memory (e.g. an IDX file), shared by every dataset cut
/// from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImages {
    origin: String,
    width: usize,
    height: usize,
    channels: usize,
    data: Vec<u8>,
}

impl RawImages {
    /// Images of `width × height × channels` bytes each, back to back in `data`; `origin`
    /// names them in messages (e.g. the file they came from).
    pub fn new(
        origin: impl Into<String>,
        width: usize,
        height: usize,
        channels: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        // Validates channels and sides.
        Bitmap::new(width, height, channels, vec![0; width * height * channels])?;
        let size = width * height * channels;
        if data.len() / size * size != data.len() {
            return Err(DataError::arg(
                "raw images",
                format!("{} bytes is not a multiple of {size}", data.len()),
            ));
        }
        Ok(Self {
            origin: origin.into(),
            width,
            height,
            channels,
            data,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.data.len() / (self.width * self.height * self.channels)
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Image `i`, copied out.
    pub fn get(&self, i: usize) -> Option<Bitmap> {
        let size = self.width * self.height * self.channels;
        let bytes = self.data.get(i * size..(i + 1) * size)?;
        Bitmap::new(self.width, self.height, self.channels, bytes.to_vec()).ok()
    }
}

/// Where an item's pixels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An encoded image file, decoded when its batch is built.
    File(PathBuf),
    /// Image `i` of the dataset's [`RawImages`].
    Raw(usize),
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageItem {
    /// Where the pixels are.
    pub source: ImageSource,
    /// Class index into [`ImageDataset::classes`].
    pub label: u32,
}

/// A list of labelled images with class names. Cheap to clone: raw pixels are shared.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    name: String,
    classes: Arc<[String]>,
    items: Vec<ImageItem>,
    raw: Option<Arc<RawImages>>,
}

impl ImageDataset {
    fn checked(
        name: String,
        classes: Vec<String>,
        items: Vec<ImageItem>,
        raw: Option<Arc<RawImages>>,
    ) -> Result<Self> {
        if let Some((i, item)) = items
            .iter()
            .enumerate()
            .find(|(_, it)| it.label as usize >= classes.len())
        {
            return Err(DataError::arg(
                "dataset labels",
                format!(
                    "{name}: item {i} has label {} but there are {} classes",
                    item.label,
                    classes.len()
                ),
            ));
        }
        Ok(Self {
            name,
            classes: classes.into(),
            items,
            raw,
        })
    }

    /// A dataset of image files with class indices into `classes`; `name` appears in messages.
    pub fn from_files(
        name: impl Into<String>,
        classes: Vec<String>,
        files: Vec<(PathBuf, u32)>,
    ) -> Result<Self> {
        let items = files
            .into_iter()
            .map(|(path, label)| ImageItem {
                source: ImageSource::File(path),
                label,
            })
            .collect();
        Self::checked(name.into(), classes, items, None)
    }

    /// A dataset of in-memory images, one label per image.
    pub fn from_raw(raw: RawImages, labels: Vec<u32>, classes: Vec<String>) -> Result<Self> {
        if labels.len() != raw.len() {
            return Err(DataError::arg(
                "raw labels",
                format!(
                    "{}: {} images but {} labels",
                    raw.origin,
                    raw.len(),
                    labels.len()
                ),
            ));
        }
        let items = labels
            .into_iter()
            .enumerate()
            .map(|(i, label)| ImageItem {
                source: ImageSource::Raw(i),
                label,
            })
            .collect();
        Self::checked(raw.origin.clone(), classes, items, Some(Arc::new(raw)))
    }

    /// The name given at construction (usually the source file or folder).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Class names; item labels index into this.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The items.
    pub fn items(&self) -> &[ImageItem] {
        &self.items
    }

    /// Item labels, in item order.
    pub fn labels(&self) -> Vec<u32> {
        self.items.iter().map(|it| it.label).collect()
    }

    /// Number of items of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for it in &self.items {
            counts[it.label as usize] += 1;
        }
        counts
    }

    /// Where item `i` comes from, for messages: its file, or `name[#k]` for raw images.
    pub fn describe(&self, i: usize) -> String {
        match self.items.get(i).map(|it| &it.source) {
            Some(ImageSource::File(p)) => p.display().to_string(),
            Some(ImageSource::Raw(k)) => format!("{}[#{k}]", self.name),
            None => format!("{}[item {i} of {}]", self.name, self.len()),
        }
    }

    /// Reads (and for files, decodes) item `i`'s pixels.
    pub fn load(&self, i: usize) -> Result<Bitmap> {
        let missing = || {
            DataError::arg(
                "item index",
                format!("{} has no item {i}", self.describe(i)),
            )
        };
        match &self.items.get(i).ok_or_else(missing)?.source {
            ImageSource::File(path) => Bitmap::open(path),
            ImageSource::Raw(k) => self
                .raw
                .as_ref()
                .and_then(|raw| raw.get(*k))
                .ok_or_else(missing),
        }
    }

    /// The items at `indices` (in that order), sharing class names and raw pixels.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let items = indices
            .iter()
            .map(|&i| {
                self.items.get(i).cloned().ok_or_else(|| {
                    DataError::arg(
                        "subset indices",
                        format!("index {i} is out of range for {} items", self.len()),
                    )
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            name: self.name.clone(),
            classes: self.classes.clone(),
            items,
            raw: self.raw.clone(),
        })
    }
}
