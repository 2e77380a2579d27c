//! The architecture's layering, checked by a test: the sans-IO core
//! (`engine`, `quorum`) names no module that does I/O, so that the
//! simulator runs the same decisions the daemon does. The simulator
//! (`engine/sim/`) may use the witness arbiter, itself sans-IO, but no
//! more than the core may of the rest.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Modules that do I/O (or parse the outside world's configs).
    const IO_MODULES: [&str; 6] = ["link", "volume", "store", "frontend", "daemon", "config"];
    /// The witness's I/O parts.
    const WITNESS_IO: [&str; 4] = [
        "witness::client",
        "witness::server",
        "WitnessClient",
        "WitnessServer",
    ];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("source directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The crate modules `text` names: `crate::x` paths and the members of
    /// `crate::{x, y::z}` groups.
    fn crate_paths(text: &str) -> Vec<String> {
        let mut paths = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                paths.extend(group[..end].split(',').map(|p| p.trim().to_string()));
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                paths.push(rest[..end].to_string());
            }
        }
        paths
    }

    /// What is wrong with the core file `name` holding `text` (comments,
    /// which may name the shell, aside).
    fn violations(name: &str, text: &str) -> Vec<String> {
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let text = code.as_str();
        let simulator = name.contains("engine/sim/");
        let mut found = Vec::new();
        for path in crate_paths(text) {
            let module = path.split("::").next().unwrap_or("");
            let io = IO_MODULES.contains(&module)
                || (module == "witness" && !simulator)
                || WITNESS_IO.iter().any(|w| path.contains(w));
            if io {
                found.push(format!("{name} uses crate::{path}"));
            }
        }
        found.extend(
            WITNESS_IO
                .iter()
                .filter(|w| !w.contains("::") && text.contains(*w))
                .map(|w| format!("{name} names {w}")),
        );
        found
    }

    #[test]
    fn the_engine_and_quorum_import_no_io_module() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src.join("engine"), &mut files);
        rust_files(&src.join("quorum"), &mut files);
        assert!(
            files.len() >= 8,
            "the core's files are where this test looks"
        );
        let found: Vec<String> = files
            .iter()
            .flat_map(|f| {
                let text = std::fs::read_to_string(f).expect("a source file");
                violations(&f.display().to_string(), &text)
            })
            .collect();
        assert!(found.is_empty(), "the sans-IO core imports I/O: {found:#?}");
    }

    #[test]
    fn the_check_sees_single_and_grouped_imports() {
        assert!(!violations("src/engine/x.rs", "use crate::store::AlignedBuf;").is_empty());
        assert!(!violations("src/engine/x.rs", "use crate::{meta, link::wire};").is_empty());
        assert!(!violations("src/engine/x.rs", "crate::witness::WitnessOp").is_empty());
        assert!(violations("src/engine/sim/mod.rs", "use crate::witness::Arbiter;").is_empty());
        assert!(!violations("src/engine/sim/mod.rs", "crate::witness::client::X").is_empty());
        assert!(violations("src/engine/x.rs", "use crate::meta::Bitmap;").is_empty());
        assert!(violations("src/engine/x.rs", "//! The shell (`crate::volume`)").is_empty());
    }
}
