//! `DIR/<class>/*.{png,jpg,jpeg}` discovery and parallel batch decoding.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageReader};

use super::{DataError, Preprocess};

/// File extensions (compared case-insensitively) that are loaded as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// A labelled image folder: one subdirectory per class, images directly inside it.
///
/// Classes are the subdirectory names sorted by name (byte order); a class's label is its
/// index in `classes`. `items` lists every image, class by class, files sorted by name.
/// Hidden entries (names starting with `.`) and files with other extensions are ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub items: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Scans `dir`. Fails if it is missing, not a directory, has no class subdirectories or
    /// contains no images at all (classes without images are kept so labels stay stable).
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let meta = fs::metadata(dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DataError::NotFound {
                    path: dir.to_path_buf(),
                }
            } else {
                io_error(dir, &e)
            }
        })?;
        if !meta.is_dir() {
            return Err(DataError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }

        let mut class_dirs: Vec<(OsString, PathBuf)> = list_dir(dir)?
            .into_iter()
            .filter(|(_, path)| path.is_dir())
            .collect();
        if class_dirs.is_empty() {
            return Err(DataError::NoClasses {
                path: dir.to_path_buf(),
            });
        }
        // OsString ordering is byte order on Unix.
        class_dirs.sort();

        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut items = Vec::new();
        for (label, (name, class_dir)) in class_dirs.into_iter().enumerate() {
            classes.push(name.to_string_lossy().into_owned());
            let mut files: Vec<(OsString, PathBuf)> = list_dir(&class_dir)?
                .into_iter()
                .filter(|(_, path)| has_image_extension(path) && path.is_file())
                .collect();
            files.sort();
            items.extend(files.into_iter().map(|(_, path)| (path, label)));
        }
        if items.is_empty() {
            return Err(DataError::NoImages {
                path: dir.to_path_buf(),
            });
        }
        Ok(Self {
            root: dir.to_path_buf(),
            classes,
            items,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True if there are no images (never the case for a folder returned by [`ImageFolder::open`]).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Non-hidden entries of `dir` as `(file name, path)`.
fn list_dir(dir: &Path) -> Result<Vec<(OsString, PathBuf)>, DataError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, &e))? {
        let entry = entry.map_err(|e| io_error(dir, &e))?;
        let name = entry.file_name();
        if name.as_encoded_bytes().first() == Some(&b'.') {
            continue;
        }
        out.push((name, entry.path()));
    }
    Ok(out)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn io_error(path: &Path, e: &std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        reason: one_line(&e.to_string()),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Decodes `items` into one NCHW `f32` tensor of length `items.len() * c * h * w`.
///
/// Each image is converted to grayscale (`c == 1`) or RGB (`c == 3`), resized to `h x w` with
/// bilinear (`Triangle`) filtering if its size differs, and normalised per channel as
/// `(p as f32 / 255.0 - mean[ch]) / std[ch]`. Labels are ignored. Images are decoded in
/// parallel; the output order (and which error is reported: the first failing item) is
/// deterministic.
pub fn load_batch(
    items: &[(PathBuf, usize)],
    c: usize,
    h: usize,
    w: usize,
    pre: &Preprocess,
) -> Result<Vec<f32>, DataError> {
    if c != 1 && c != 3 {
        return Err(DataError::UnsupportedChannels { channels: c });
    }
    let norm = pre.per_channel(c)?;
    let shape_err = |reason| DataError::InvalidShape {
        height: h,
        width: w,
        reason,
    };
    if h == 0 || w == 0 {
        return Err(shape_err("height and width must be positive"));
    }
    let (h32, w32) = match (u32::try_from(h), u32::try_from(w)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(shape_err("too large")),
    };
    let per_image = c
        .checked_mul(h)
        .and_then(|x| x.checked_mul(w))
        .ok_or_else(|| shape_err("too large"))?;
    let total = per_image
        .checked_mul(items.len())
        .ok_or_else(|| shape_err("batch too large"))?;
    if items.is_empty() {
        return Ok(Vec::new());
    }

    let mut out = vec![0f32; total];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    let per_thread = items.len().div_ceil(threads);
    let target = Target {
        c,
        h: h32,
        w: w32,
        norm: &norm,
    };
    if threads <= 1 {
        decode_into(items, &mut out, per_image, &target)?;
    } else {
        let results: Vec<Result<(), DataError>> = std::thread::scope(|s| {
            let handles: Vec<_> = items
                .chunks(per_thread)
                .zip(out.chunks_mut(per_thread * per_image))
                .map(|(its, dst)| s.spawn(|| decode_into(its, dst, per_image, &target)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        // Chunks are in item order and each stops at its first failure, so the first
        // error here is the first failing item overall.
        results.into_iter().collect::<Result<(), _>>()?;
    }
    Ok(out)
}

struct Target<'a> {
    c: usize,
    h: u32,
    w: u32,
    norm: &'a [(f32, f32)],
}

fn decode_into(
    items: &[(PathBuf, usize)],
    out: &mut [f32],
    per_image: usize,
    t: &Target<'_>,
) -> Result<(), DataError> {
    for ((path, _), dst) in items.iter().zip(out.chunks_mut(per_image)) {
        let img = decode(path)?;
        let plane = t.h as usize * t.w as usize;
        let raw: Vec<u8> = if t.c == 1 {
            let mut g = img.to_luma8();
            if g.dimensions() != (t.w, t.h) {
                g = imageops::resize(&g, t.w, t.h, FilterType::Triangle);
            }
            g.into_raw()
        } else {
            let mut rgb = img.to_rgb8();
            if rgb.dimensions() != (t.w, t.h) {
                rgb = imageops::resize(&rgb, t.w, t.h, FilterType::Triangle);
            }
            rgb.into_raw()
        };
        debug_assert_eq!(raw.len(), plane * t.c);
        for (ch, &(mean, std)) in t.norm.iter().enumerate() {
            let dst_plane = &mut dst[ch * plane..(ch + 1) * plane];
            for (d, px) in dst_plane.iter_mut().zip(raw.iter().skip(ch).step_by(t.c)) {
                *d = (*px as f32 / 255.0 - mean) / std;
            }
        }
    }
    Ok(())
}

fn decode(path: &Path) -> Result<DynamicImage, DataError> {
    let err = |reason: String| DataError::Decode {
        path: path.to_path_buf(),
        reason: one_line(&reason),
    };
    ImageReader::open(path)
        .map_err(|e| err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?
        .decode()
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Rgb, RgbImage};
    use tempfile::TempDir;

    fn solid_rgb(path: &Path, w: u32, h: u32, px: [u8; 3]) {
        RgbImage::from_pixel(w, h, Rgb(px)).save(path).unwrap();
    }

    /// root/
    ///   b_dogs/  z.png a.JPG notes.txt .hidden.png
    ///   a_cats/  2.png 10.png
    ///   .git/    x.png
    ///   readme.png (file at the root: ignored)
    ///   empty/   (class without images)
    fn fixture() -> TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["b_dogs", "a_cats", ".git", "empty"] {
            fs::create_dir(r.join(d)).unwrap();
        }
        solid_rgb(&r.join("b_dogs/z.png"), 2, 2, [255, 0, 0]);
        solid_rgb(&r.join("b_dogs/a.JPG"), 2, 2, [0, 255, 0]);
        fs::write(r.join("b_dogs/notes.txt"), "hi").unwrap();
        solid_rgb(&r.join("b_dogs/.hidden.png"), 2, 2, [0, 0, 0]);
        solid_rgb(&r.join("a_cats/2.png"), 2, 2, [0, 0, 255]);
        solid_rgb(&r.join("a_cats/10.png"), 2, 2, [10, 20, 30]);
        solid_rgb(&r.join(".git/x.png"), 2, 2, [0, 0, 0]);
        solid_rgb(&r.join("readme.png"), 2, 2, [0, 0, 0]);
        t
    }

    #[test]
    fn classes_labels_and_order() {
        let t = fixture();
        let f = ImageFolder::open(t.path()).unwrap();
        assert_eq!(f.classes, vec!["a_cats", "b_dogs", "empty"]);
        let got: Vec<(String, usize)> = f
            .items
            .iter()
            .map(|(p, l)| {
                let rel = p.strip_prefix(t.path()).unwrap();
                (rel.to_string_lossy().replace('\\', "/"), *l)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a_cats/10.png".to_string(), 0),
                ("a_cats/2.png".to_string(), 0),
                ("b_dogs/a.JPG".to_string(), 1),
                ("b_dogs/z.png".to_string(), 1),
            ]
        );
        assert_eq!(f.len(), 4);
        assert_eq!(f.root, t.path());
    }

    #[test]
    fn rgb_preprocessing_numbers_and_layout() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.png");
        // 2x1 image: left pixel (0, 128, 255), right pixel (51, 102, 204).
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, Rgb([0, 128, 255]));
        img.put_pixel(1, 0, Rgb([51, 102, 204]));
        img.save(&p).unwrap();
        let pre = Preprocess::imagenet();
        let items = vec![(p.clone(), 0), (p, 0)];
        let out = load_batch(&items, 3, 1, 2, &pre).unwrap();
        assert_eq!(out.len(), 2 * 3 * 2);
        let f = |px: u8, ch: usize| (px as f32 / 255.0 - pre.mean[ch]) / pre.std[ch];
        let expect = [
            f(0, 0),
            f(51, 0),
            f(128, 1),
            f(102, 1),
            f(255, 2),
            f(204, 2),
        ];
        assert_eq!(&out[..6], &expect);
        assert_eq!(&out[6..], &expect);
        // Bit-exact against the reference formula, spot-check a known value.
        assert_eq!(out[0], (0.0f32 - 0.485) / 0.229);
    }

    #[test]
    fn identity_preprocess_scales_to_unit_range() {
        let t = fixture();
        let f = ImageFolder::open(t.path()).unwrap();
        let out = load_batch(&f.items[3..], 3, 2, 2, &Preprocess::default()).unwrap();
        // b_dogs/z.png is solid red.
        assert_eq!(
            out,
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn grayscale() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("g.png");
        solid_rgb(&p, 3, 3, [200, 100, 50]);
        let expect_px = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, Rgb([200, 100, 50])))
            .to_luma8()
            .get_pixel(0, 0)
            .0[0];
        let pre = Preprocess {
            mean: vec![0.5],
            std: vec![0.25],
        };
        let out = load_batch(&[(p, 0)], 1, 3, 3, &pre).unwrap();
        assert_eq!(out.len(), 9);
        let v = (expect_px as f32 / 255.0 - 0.5) / 0.25;
        assert!(out.iter().all(|&x| x == v), "{out:?} vs {v}");

        // A grayscale file loaded as RGB replicates the channel.
        let g = t.path().join("l.png");
        GrayImage::from_pixel(2, 2, image::Luma([77]))
            .save(&g)
            .unwrap();
        let out = load_batch(&[(g, 0)], 3, 2, 2, &Preprocess::default()).unwrap();
        assert!(out.iter().all(|&x| x == 77.0 / 255.0));
    }

    #[test]
    fn resize_shape_and_values() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("big.png");
        solid_rgb(&p, 17, 9, [40, 80, 120]);
        let items: Vec<_> = (0..5).map(|i| (p.clone(), i)).collect();
        let out = load_batch(&items, 3, 4, 6, &Preprocess::default()).unwrap();
        assert_eq!(out.len(), 5 * 3 * 4 * 6);
        // A solid image stays solid after bilinear resizing.
        for (ch, v) in [40u8, 80, 120].into_iter().enumerate() {
            let plane = &out[ch * 24..(ch + 1) * 24];
            assert!(plane.iter().all(|&x| x == v as f32 / 255.0), "{plane:?}");
        }
        // Matches image's own Triangle resize.
        let mut img = RgbImage::new(5, 3);
        for (x, y, px) in img.enumerate_pixels_mut() {
            *px = Rgb([(x * 50) as u8, (y * 100) as u8, 7]);
        }
        let q = t.path().join("grad.png");
        img.save(&q).unwrap();
        let out = load_batch(&[(q, 0)], 3, 2, 3, &Preprocess::default()).unwrap();
        let r = imageops::resize(&img, 3, 2, FilterType::Triangle);
        for (x, y, px) in r.enumerate_pixels() {
            for ch in 0..3 {
                let i = ch * 6 + y as usize * 3 + x as usize;
                assert_eq!(out[i], px.0[ch] as f32 / 255.0);
            }
        }
    }

    #[test]
    fn parallel_order_is_deterministic() {
        let t = tempfile::tempdir().unwrap();
        let items: Vec<_> = (0..37u8)
            .map(|i| {
                let p = t.path().join(format!("{i}.png"));
                solid_rgb(&p, 1, 1, [i, i, i]);
                (p, 0)
            })
            .collect();
        let out = load_batch(&items, 1, 1, 1, &Preprocess::default()).unwrap();
        let expect: Vec<f32> = (0..37u8).map(|i| i as f32 / 255.0).collect();
        assert_eq!(out, expect);
        assert!(load_batch(&[], 3, 2, 2, &Preprocess::default())
            .unwrap()
            .is_empty());
    }

    fn assert_one_line(e: &DataError, needle: &str) {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
    }

    #[test]
    fn open_errors() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("nope");
        let e = ImageFolder::open(&missing).unwrap_err();
        assert!(matches!(e, DataError::NotFound { .. }));
        assert_one_line(&e, &missing.display().to_string());

        let file = t.path().join("file.png");
        solid_rgb(&file, 1, 1, [0, 0, 0]);
        let e = ImageFolder::open(&file).unwrap_err();
        assert!(matches!(e, DataError::NotADirectory { .. }));
        assert_one_line(&e, "file.png");

        // Only files and hidden dirs: no classes.
        fs::create_dir(t.path().join(".hidden")).unwrap();
        let e = ImageFolder::open(t.path()).unwrap_err();
        assert!(matches!(e, DataError::NoClasses { .. }));
        assert_one_line(&e, &t.path().display().to_string());

        // Classes but no images.
        fs::create_dir(t.path().join("cls")).unwrap();
        fs::write(t.path().join("cls/a.txt"), "x").unwrap();
        fs::create_dir(t.path().join("cls/sub.png")).unwrap();
        let e = ImageFolder::open(t.path()).unwrap_err();
        assert!(matches!(e, DataError::NoImages { .. }));
        assert_one_line(&e, &t.path().display().to_string());
    }

    #[test]
    fn decode_error_names_file_and_is_first_failure() {
        let t = tempfile::tempdir().unwrap();
        let mut items = Vec::new();
        for i in 0..20 {
            let p = t.path().join(format!("{i:02}.png"));
            if i == 7 || i == 15 {
                fs::write(&p, b"not an image").unwrap();
            } else {
                solid_rgb(&p, 2, 2, [1, 2, 3]);
            }
            items.push((p, 0));
        }
        let e = load_batch(&items, 3, 2, 2, &Preprocess::default()).unwrap_err();
        assert!(matches!(e, DataError::Decode { .. }));
        assert_one_line(&e, "07.png");

        let truncated = t.path().join("trunc.png");
        let bytes = fs::read(&items[0].0).unwrap();
        fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_batch(&[(truncated, 0)], 3, 2, 2, &Preprocess::default()).unwrap_err();
        assert_one_line(&e, "trunc.png");

        let gone = t.path().join("gone.png");
        let e = load_batch(&[(gone, 0)], 3, 2, 2, &Preprocess::default()).unwrap_err();
        assert_one_line(&e, "gone.png");
    }

    #[test]
    fn batch_argument_errors() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.png");
        solid_rgb(&p, 2, 2, [1, 2, 3]);
        let items = [(p, 0)];
        let ok = Preprocess::default();
        let e = load_batch(&items, 4, 2, 2, &ok).unwrap_err();
        assert!(matches!(e, DataError::UnsupportedChannels { channels: 4 }));
        assert_one_line(&e, "4");
        let e = load_batch(&items, 3, 0, 2, &ok).unwrap_err();
        assert!(matches!(e, DataError::InvalidShape { .. }));

        let bad_len = Preprocess {
            mean: vec![0.1, 0.2],
            std: vec![1.0],
        };
        let e = load_batch(&items, 3, 2, 2, &bad_len).unwrap_err();
        assert!(matches!(e, DataError::NormLength { what: "mean", .. }));
        assert_one_line(&e, "--mean has 2 values");
        let bad_len = Preprocess {
            mean: vec![0.1],
            std: vec![1.0, 1.0, 1.0],
        };
        let e = load_batch(&items, 1, 2, 2, &bad_len).unwrap_err();
        assert!(matches!(e, DataError::NormLength { what: "std", .. }));
        let zero = Preprocess {
            mean: vec![0.1],
            std: vec![0.0],
        };
        let e = load_batch(&items, 3, 2, 2, &zero).unwrap_err();
        assert!(matches!(e, DataError::BadStd { channel: 0, .. }));
        assert_one_line(&e, "non-zero");
    }
}
