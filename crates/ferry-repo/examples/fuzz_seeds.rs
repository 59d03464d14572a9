//! Writes valid seed inputs for the fuzz targets (see `fuzz/seed-corpus.sh`).

fn main() {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for (target, name, data) in ferry_repo::fuzz::seeds() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("create corpus directory");
        std::fs::write(d.join(name), data).expect("write seed");
    }
}
