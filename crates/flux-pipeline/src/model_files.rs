//! [`ModelFiles`]: where the weights and tokenizers are, found in the folder layouts people
//! already have.
//!
//! * ComfyUI models folder: the transformer in `diffusion_models/` or `unet/`, the autoencoder
//!   in `vae/`, the text encoders in `text_encoders/` or `clip/` (T5: a file name containing
//!   `t5`; CLIP: one containing `clip`). Tokenizers are not part of it (give them by path).
//! * diffusers folder (as the FLUX.1 repositories ship): `transformer/`, `vae/`,
//!   `text_encoder/` (CLIP), `text_encoder_2/` (T5), each holding its weights as one file or as
//!   shards with an index (`diffusion_pytorch_model.safetensors[.index.json]` for the
//!   transformer and autoencoder, `model.safetensors[.index.json]` for the text encoders) and
//!   a `config.json`; the tokenizers in `tokenizer/tokenizer.json` (CLIP) and
//!   `tokenizer_2/tokenizer.json` (T5).

use crate::{PipelineError, Result};
use std::path::{Path, PathBuf};

/// The folders that mark a diffusers layout, and the ones that mark a ComfyUI layout.
const DIFFUSERS_MARKS: [&str; 2] = ["model_index.json", "transformer/"];
const COMFY_MARKS: [&str; 5] = [
    "diffusion_models/",
    "unet/",
    "vae/",
    "text_encoders/",
    "clip/",
];

/// Where the model files are. The weight paths may be single `.safetensors` files, shard
/// indexes (`*.safetensors.index.json`) or folders of shards.
#[derive(Clone, Debug, Default)]
pub struct ModelFiles {
    /// Transformer weights.
    pub transformer: PathBuf,
    /// Autoencoder weights.
    pub vae: PathBuf,
    /// T5 weights.
    pub t5: PathBuf,
    /// CLIP weights.
    pub clip: PathBuf,
    /// T5 `tokenizer.json`, when known (found in a diffusers folder, or given).
    pub t5_tokenizer: Option<PathBuf>,
    /// CLIP `tokenizer.json`, when known (found in a diffusers folder, or given).
    pub clip_tokenizer: Option<PathBuf>,
}

fn model_err(message: String) -> PipelineError {
    PipelineError::Model(message)
}

impl ModelFiles {
    /// Finds the files in a models folder of either layout (see the module docs): a folder with
    /// `model_index.json` or `transformer/` is read as diffusers, one with any of the ComfyUI
    /// folders as ComfyUI; anything else is an error listing what was looked for.
    pub fn from_models_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(model_err(format!(
                "models folder {} does not exist",
                dir.display()
            )));
        }
        let has = |mark: &str| match mark.strip_suffix('/') {
            Some(sub) => dir.join(sub).is_dir(),
            None => dir.join(mark).is_file(),
        };
        if DIFFUSERS_MARKS.iter().any(|m| has(m)) {
            Self::from_diffusers_dir(dir)
        } else if COMFY_MARKS.iter().any(|m| has(m)) {
            Self::from_comfy_dir(dir)
        } else {
            Err(model_err(format!(
                "{} is not a models folder: looked for a diffusers layout ({}) and a ComfyUI \
                 layout ({})",
                dir.display(),
                DIFFUSERS_MARKS.join(", "),
                COMFY_MARKS.join(", ")
            )))
        }
    }

    /// Finds the files in a ComfyUI-style models folder: the transformer in `diffusion_models/`
    /// or `unet/`, the autoencoder in `vae/`, the text encoders in `text_encoders/` or `clip/`
    /// (T5: a name containing `t5`; CLIP: a name containing `clip`). Each must be exactly one
    /// `.safetensors` file.
    pub fn from_comfy_dir(dir: &Path) -> Result<Self> {
        let pick =
            |subdirs: &[&str], filter: &dyn Fn(&str) -> bool, what: &str| -> Result<PathBuf> {
                let mut found = Vec::new();
                for s in subdirs {
                    let Ok(entries) = std::fs::read_dir(dir.join(s)) else {
                        continue;
                    };
                    for e in entries.flatten() {
                        let p = e.path();
                        let name = p
                            .file_name()
                            .and_then(|n| n.to_str())
                            .unwrap_or("")
                            .to_ascii_lowercase();
                        if name.ends_with(".safetensors") && filter(&name) {
                            found.push(p);
                        }
                    }
                }
                found.sort();
                match found.len() {
                    1 => Ok(found.remove(0)),
                    0 => Err(model_err(format!(
                        "no {what} .safetensors file in {} ({})",
                        dir.display(),
                        subdirs.join("/ or ") + "/"
                    ))),
                    _ => Err(model_err(format!(
                        "several {what} files in {}: {}; pass the one to use explicitly",
                        dir.display(),
                        found
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            };
        Ok(Self {
            transformer: pick(&["diffusion_models", "unet"], &|_| true, "transformer")?,
            vae: pick(&["vae"], &|_| true, "autoencoder")?,
            t5: pick(
                &["text_encoders", "clip"],
                &|n| n.contains("t5"),
                "T5 encoder",
            )?,
            clip: pick(
                &["text_encoders", "clip"],
                &|n| n.contains("clip"),
                "CLIP text encoder",
            )?,
            t5_tokenizer: None,
            clip_tokenizer: None,
        })
    }

    /// Finds the files in a diffusers folder (see the module docs). The tokenizers are taken
    /// when present; a missing one is reported when the pipeline is loaded, so that one given
    /// by path can stand in for it.
    pub fn from_diffusers_dir(dir: &Path) -> Result<Self> {
        let weights = |sub: &str, stem: &str, what: &str| -> Result<PathBuf> {
            let folder = dir.join(sub);
            let index = folder.join(format!("{stem}.safetensors.index.json"));
            let single = folder.join(format!("{stem}.safetensors"));
            if index.is_file() {
                Ok(index)
            } else if single.is_file() {
                Ok(single)
            } else {
                Err(model_err(format!(
                    "diffusers folder {}: no {what} weights (looked for {sub}/{stem}.safetensors \
                     and {sub}/{stem}.safetensors.index.json)",
                    dir.display()
                )))
            }
        };
        // CLIP's folder may hold only `vocab.json` + `merges.txt`; the folder is then given to
        // the tokenizer loader, which assembles the tokenizer from them.
        let tokenizer = |sub: &str| {
            let p = dir.join(sub).join("tokenizer.json");
            let vocab_merges = sub == "tokenizer"
                && dir.join(sub).join("vocab.json").is_file()
                && dir.join(sub).join("merges.txt").is_file();
            if p.is_file() {
                Some(p)
            } else {
                vocab_merges.then(|| dir.join(sub))
            }
        };
        Ok(Self {
            transformer: weights("transformer", "diffusion_pytorch_model", "transformer")?,
            vae: weights("vae", "diffusion_pytorch_model", "autoencoder")?,
            t5: weights("text_encoder_2", "model", "T5 encoder")?,
            clip: weights("text_encoder", "model", "CLIP text encoder")?,
            t5_tokenizer: tokenizer("tokenizer_2"),
            clip_tokenizer: tokenizer("tokenizer"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ModelFiles;
    use std::path::{Path, PathBuf};

    /// An empty scratch folder, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("flux-model-files-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn touch(root: &Path, rel: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn a_diffusers_folder_prefers_the_shard_index_and_finds_the_tokenizers() {
        let d = Scratch::new("index");
        let r = d.path();
        touch(r, "model_index.json");
        touch(
            r,
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        );
        touch(
            r,
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        );
        touch(
            r,
            "transformer/diffusion_pytorch_model.safetensors.index.json",
        );
        touch(r, "vae/diffusion_pytorch_model.safetensors");
        touch(r, "text_encoder/model.safetensors");
        touch(r, "text_encoder_2/model.safetensors.index.json");
        touch(r, "tokenizer/tokenizer.json");
        touch(r, "tokenizer_2/tokenizer.json");
        let f = ModelFiles::from_models_dir(r).unwrap();
        assert_eq!(
            f.transformer,
            r.join("transformer/diffusion_pytorch_model.safetensors.index.json")
        );
        assert_eq!(f.vae, r.join("vae/diffusion_pytorch_model.safetensors"));
        assert_eq!(f.clip, r.join("text_encoder/model.safetensors"));
        assert_eq!(f.t5, r.join("text_encoder_2/model.safetensors.index.json"));
        assert_eq!(f.clip_tokenizer, Some(r.join("tokenizer/tokenizer.json")));
        assert_eq!(f.t5_tokenizer, Some(r.join("tokenizer_2/tokenizer.json")));
    }

    #[test]
    fn a_diffusers_folder_without_a_part_names_what_was_looked_for() {
        let d = Scratch::new("missing");
        let r = d.path();
        touch(r, "transformer/diffusion_pytorch_model.safetensors");
        touch(r, "vae/diffusion_pytorch_model.safetensors");
        touch(r, "text_encoder/model.safetensors");
        let e = ModelFiles::from_models_dir(r).unwrap_err().to_string();
        assert!(
            e.contains("T5") && e.contains("text_encoder_2/model.safetensors.index.json"),
            "{e}"
        );
    }

    #[test]
    fn an_unrecognised_folder_lists_both_layouts() {
        let d = Scratch::new("unknown");
        touch(d.path(), "weights/flux.safetensors");
        let e = ModelFiles::from_models_dir(d.path())
            .unwrap_err()
            .to_string();
        for needle in [
            "not a models folder",
            "transformer/",
            "diffusion_models/",
            "text_encoders/",
        ] {
            assert!(e.contains(needle), "`{needle}` not in: {e}");
        }
    }
}
