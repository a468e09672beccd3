//! The man pages in man/ are generated from the clap definitions; this fails when they are stale.
//! Regenerate with `ZQ_BLESS=1 cargo test --test it man`.

use crate::util::root;

#[test]
fn man_pages_are_up_to_date() {
    let pages = zq::cli::man::render().unwrap();
    let dir = root().join("man");
    let bless = std::env::var_os("ZQ_BLESS").is_some();
    let mut stale = Vec::new();
    for (name, text) in &pages {
        let path = dir.join(name);
        let current = std::fs::read(&path).unwrap_or_default();
        if current != *text {
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, text).unwrap();
            } else {
                stale.push(name.clone());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "stale man pages {stale:?}: run ZQ_BLESS=1 cargo test --test it man"
    );
}
