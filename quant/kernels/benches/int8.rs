//! `cargo bench -p zq-kernels --bench int8`: GOPS of every available integer kernel variant on
//! typical layer shapes (single thread). The work is in `zq_kernels::int8::bench`, so `zq bench`
//! can print the same table. `ZQ_BENCH_FILTER=conv` (any substring of "op shape") runs a subset;
//! `ZQ_KERNELS=avx2` (etc.) runs one variant only.

use zq_kernels::int8::{bench, Kernels};

fn main() {
    let filter = std::env::var("ZQ_BENCH_FILTER").unwrap_or_default();
    let variants: Vec<&Kernels> = match std::env::var("ZQ_KERNELS") {
        Ok(_) => match Kernels::from_env() {
            Ok(k) => vec![k],
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        },
        Err(_) => Kernels::available().collect(),
    };
    let peak = bench::vnni_peak();
    let rows = bench::run_matching(&variants, &filter);
    print!("{}", bench::report(&rows, peak.as_ref()));
}
