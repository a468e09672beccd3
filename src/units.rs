//! Units for people: byte counts as `512 B`, `1.07 MB`.

/// Human-readable size with decimal units and 3 significant digits, e.g. `512 B`, `1.07 MB`,
/// `12.3 KB`, `400 GB`.
pub fn human_bytes(n: u64) -> String {
    const NAMES: [&str; 7] = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut k = 1;
    loop {
        let v = n as f64 / 1000f64.powi(k as i32);
        if v >= 999.5 && k + 1 < NAMES.len() {
            k += 1;
            continue;
        }
        let s = if v < 9.995 {
            format!("{v:.2}")
        } else if v < 99.95 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        };
        return format!("{s} {}", NAMES[k]);
    }
}
