//! Random, truncated and mutated bytes fed to the ONNX reader (and, when they import, to the
//! specialiser): errors are fine, panics are not.

use proptest::prelude::*;
use zq::onnx::read::import_bytes;

use crate::util::fixture;

fn models() -> Vec<Vec<u8>> {
    [
        "digits_bn",
        "mobile_dw",
        "ops_zoo_op11",
        "ops_zoo_op21",
        "folded_nobn",
    ]
    .iter()
    .map(|m| std::fs::read(fixture(&format!("{m}/model.onnx"))).unwrap())
    .collect()
}

fn exercise(bytes: &[u8]) {
    if let Ok((g, _)) = import_bytes(bytes, None) {
        let _ = zq::exec::Plan::new(&g, 2);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        exercise(&bytes);
    }

    #[test]
    fn truncated(which in 0usize..5, frac in 0.0f64..1.0) {
        let m = &models()[which];
        let cut = (m.len() as f64 * frac) as usize;
        exercise(&m[..cut]);
    }

    #[test]
    fn mutated(which in 0usize..5, flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut m = models()[which].clone();
        for (i, b) in flips {
            let i = i.index(m.len());
            m[i] = b;
        }
        exercise(&m);
    }
}
