//! Labelled image data for `zq eval` (and calibration): an ImageNet-style
//! `DIR/<class>/*.{png,jpg,jpeg}` folder, decoded and normalised into NCHW `f32` batches.

mod imagefolder;

use std::path::PathBuf;

pub use imagefolder::{load_batch, ImageFolder, IMAGE_EXTENSIONS};

/// Everything that can go wrong while reading an image folder or building a batch.
///
/// Every message is a single line and names the file or directory involved (if any).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("image folder {} does not exist", .path.display())]
    NotFound { path: PathBuf },

    #[error("image folder {} is not a directory", .path.display())]
    NotADirectory { path: PathBuf },

    #[error("cannot read {}: {reason}", .path.display())]
    Io { path: PathBuf, reason: String },

    #[error(
        "image folder {} has no class subdirectories (expected DIR/<class>/*.png|jpg|jpeg)",
        .path.display()
    )]
    NoClasses { path: PathBuf },

    #[error(
        "image folder {} contains no images (expected DIR/<class>/*.png|jpg|jpeg)",
        .path.display()
    )]
    NoImages { path: PathBuf },

    #[error("cannot decode image {}: {reason}", .path.display())]
    Decode { path: PathBuf, reason: String },

    #[error("unsupported channel count {channels} (images can be loaded with 1 or 3 channels)")]
    UnsupportedChannels { channels: usize },

    #[error("invalid input size {height}x{width}: {reason}")]
    InvalidShape {
        height: usize,
        width: usize,
        reason: &'static str,
    },

    #[error("--{what} has {len} values but the model input has {channels} channel(s) (give 1 value or {channels})")]
    NormLength {
        what: &'static str,
        len: usize,
        channels: usize,
    },

    #[error(
        "--std value {value} for channel {channel} is invalid (it must be finite and non-zero)"
    )]
    BadStd { channel: usize, value: f32 },

    #[error("--mean value {value} for channel {channel} is not finite")]
    BadMean { channel: usize, value: f32 },
}

/// Per-channel normalisation applied after scaling pixels to `[0, 1]`:
/// `x = (p as f32 / 255.0 - mean[ch]) / std[ch]`.
///
/// `mean` and `std` each hold either one value (used for every channel) or one value per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Default for Preprocess {
    /// Identity normalisation: pixels are only scaled to `[0, 1]`.
    fn default() -> Self {
        Self {
            mean: vec![0.0],
            std: vec![1.0],
        }
    }
}

impl Preprocess {
    /// The torchvision ImageNet normalisation (RGB order).
    pub fn imagenet() -> Self {
        Self {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }

    /// Checks the lengths against `channels` and that every std is usable; returns the
    /// per-channel `(mean, std)` pairs with broadcasting resolved.
    pub fn per_channel(&self, channels: usize) -> Result<Vec<(f32, f32)>, DataError> {
        let check_len = |what: &'static str, v: &[f32]| {
            if v.len() == 1 || v.len() == channels {
                Ok(())
            } else {
                Err(DataError::NormLength {
                    what,
                    len: v.len(),
                    channels,
                })
            }
        };
        check_len("mean", &self.mean)?;
        check_len("std", &self.std)?;
        let pick = |v: &[f32], ch: usize| if v.len() == 1 { v[0] } else { v[ch] };
        (0..channels)
            .map(|ch| {
                let (mean, std) = (pick(&self.mean, ch), pick(&self.std, ch));
                if !mean.is_finite() {
                    return Err(DataError::BadMean {
                        channel: ch,
                        value: mean,
                    });
                }
                if !std.is_finite() || std == 0.0 {
                    return Err(DataError::BadStd {
                        channel: ch,
                        value: std,
                    });
                }
                Ok((mean, std))
            })
            .collect()
    }
}

/// Parses a comma-separated list of numbers such as `0.485,0.456,0.406` (spaces allowed).
pub fn parse_floats(s: &str) -> Result<Vec<f32>, String> {
    if s.trim().is_empty() {
        return Err(
            "expected comma-separated numbers like 0.485,0.456,0.406, got an empty value".into(),
        );
    }
    s.split(',')
        .enumerate()
        .map(|(i, part)| {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!(
                    "invalid number list {s:?}: value {} is empty (expected comma-separated numbers like 0.485,0.456,0.406)",
                    i + 1
                ));
            }
            let v: f32 = part.parse().map_err(|_| {
                format!("invalid number list {s:?}: {part:?} is not a number")
            })?;
            if !v.is_finite() {
                return Err(format!("invalid number list {s:?}: {part:?} is not a finite number"));
            }
            Ok(v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_floats_ok() {
        assert_eq!(
            parse_floats("0.485,0.456,0.406").unwrap(),
            vec![0.485, 0.456, 0.406]
        );
        assert_eq!(
            parse_floats(" 1 , -2.5,3e-1 ").unwrap(),
            vec![1.0, -2.5, 0.3]
        );
        assert_eq!(parse_floats("0.5").unwrap(), vec![0.5]);
    }

    #[test]
    fn parse_floats_errors() {
        for bad in ["", "  ", "1,,2", "1,", "a,b", "1;2", "nan", "1,inf"] {
            let e = parse_floats(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            assert!(!e.is_empty());
        }
        assert!(parse_floats("1,x")
            .unwrap_err()
            .contains("\"x\" is not a number"));
        assert!(parse_floats("1,,2")
            .unwrap_err()
            .contains("value 2 is empty"));
    }

    #[test]
    fn per_channel_broadcast_and_errors() {
        let p = Preprocess {
            mean: vec![0.5],
            std: vec![0.1, 0.2, 0.3],
        };
        assert_eq!(
            p.per_channel(3).unwrap(),
            vec![(0.5, 0.1), (0.5, 0.2), (0.5, 0.3)]
        );
        assert!(matches!(
            p.per_channel(1),
            Err(DataError::NormLength {
                what: "std",
                len: 3,
                channels: 1
            })
        ));
        let z = Preprocess {
            mean: vec![0.0, 0.0],
            std: vec![1.0],
        };
        assert!(matches!(
            z.per_channel(3),
            Err(DataError::NormLength {
                what: "mean",
                len: 2,
                channels: 3
            })
        ));
        let z = Preprocess {
            mean: vec![0.0],
            std: vec![1.0, 0.0, 1.0],
        };
        assert!(matches!(
            z.per_channel(3),
            Err(DataError::BadStd { channel: 1, .. })
        ));
        assert_eq!(
            Preprocess::default().per_channel(3).unwrap(),
            vec![(0.0, 1.0); 3]
        );
        assert_eq!(Preprocess::imagenet().per_channel(3).unwrap().len(), 3);
    }
}
