//! Prompt tokenizers for the two text encoders, read from Hugging Face `tokenizer.json` files.
//!
//! * T5: the unigram model of `tokenizer_2/tokenizer.json` in the diffusers layout of the Flux
//!   repositories; ids end with `</s>` and are padded with `<pad>` to the model's length (512
//!   for dev, 256 for schnell), truncating longer prompts as the reference pipelines do.
//! * CLIP: the byte-level BPE of `tokenizer/tokenizer.json`; `<|startoftext|>` ... `<|endoftext|>`
//!   padded with `<|endoftext|>` to 77 tokens.
//!
//! ComfyUI-layout checkpoints ship without these files; they come with the diffusers layout of
//! `black-forest-labs/FLUX.1-dev` / `FLUX.1-schnell` (folders `tokenizer/` and `tokenizer_2/`).

use std::path::{Path, PathBuf};
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// T5 sequence length of FLUX.1-dev.
pub const T5_LEN_DEV: usize = 512;
/// T5 sequence length of FLUX.1-schnell.
pub const T5_LEN_SCHNELL: usize = 256;
/// CLIP sequence length.
pub const CLIP_LEN: usize = 77;

/// An error reading a tokenizer or tokenizing a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file does not exist.
    #[error("tokenizer file {path} not found: {hint}")]
    Missing { path: PathBuf, hint: String },
    /// The file could not be parsed as a tokenizer.
    #[error("{path}: not a valid tokenizer.json: {message}")]
    Load { path: PathBuf, message: String },
    /// A special token the encoder needs is not in the vocabulary.
    #[error("{path}: the vocabulary has no `{token}` token (is this the {model} tokenizer?)")]
    MissingToken {
        path: PathBuf,
        token: String,
        model: &'static str,
    },
    /// The tokenizer's ids do not fit the model's embedding table.
    #[error(
        "tokenizer {path} has {found} ids but the {model} model's vocabulary has {expected}: tokenizer and weights do not belong together"
    )]
    VocabMismatch {
        path: PathBuf,
        model: &'static str,
        expected: usize,
        found: usize,
    },
    /// Tokenization itself failed.
    #[error("tokenizing the prompt failed: {0}")]
    Encode(String),
}

/// Parses a `tokenizer.json` file. The JSON syntax is checked first: the tokenizer library
/// panics instead of returning an error on some malformed files (a syntax error inside the
/// `decoder` object), so a file reaches it only once it is known to be well-formed JSON, and
/// any panic left in the library on odd content is turned into the same error.
fn tokenizer_from_json(path: &Path) -> Result<Tokenizer, TokenizerError> {
    let load_error = |message: String| TokenizerError::Load {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| load_error(e.to_string()))?;
    serde_json::from_str::<serde_json::Value>(&text).map_err(|e| load_error(e.to_string()))?;
    match std::panic::catch_unwind(|| text.parse::<Tokenizer>()) {
        Ok(parsed) => parsed.map_err(|e| load_error(e.to_string())),
        Err(panic) => Err(load_error(format!(
            "the tokenizer library failed on this file ({})",
            panic_message(&*panic)
        ))),
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Which encoder a tokenizer feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// T5 unigram (`tokenizer_2/`).
    T5,
    /// CLIP BPE (`tokenizer/`).
    Clip,
}

impl TokenizerKind {
    fn name(self) -> &'static str {
        match self {
            TokenizerKind::T5 => "T5",
            TokenizerKind::Clip => "CLIP",
        }
    }

    fn folder(self) -> &'static str {
        match self {
            TokenizerKind::T5 => "tokenizer_2",
            TokenizerKind::Clip => "tokenizer",
        }
    }

    fn pad_token(self) -> &'static str {
        match self {
            TokenizerKind::T5 => "<pad>",
            TokenizerKind::Clip => "<|endoftext|>",
        }
    }
}

/// The CLIP tokenizer from the `vocab.json` and `merges.txt` of `dir`, with the pipeline of
/// the original tokenizer (as `transformers` converts it): NFC, whitespace runs to one space and
/// lower-case; words, single digits and punctuation runs split off (the special tokens kept
/// whole), byte-level alphabet without prefix space; BPE with `</w>` ending each word and
/// `<|endoftext|>` for unknown pieces; `<|startoftext|>` ... `<|endoftext|>` around the ids.
fn clip_from_vocab_merges(dir: &Path) -> Result<Tokenizer, TokenizerError> {
    let load = |path: PathBuf, message: String| TokenizerError::Load { path, message };
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab_text = std::fs::read_to_string(&vocab_path)
        .map_err(|e| load(vocab_path.clone(), e.to_string()))?;
    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&vocab_text)
        .map_err(|e| {
            load(
                vocab_path.clone(),
                format!("expected a JSON object of token ids: {e}"),
            )
        })?;
    let merges_text = std::fs::read_to_string(&merges_path)
        .map_err(|e| load(merges_path.clone(), e.to_string()))?;
    let mut merges = Vec::new();
    for (i, line) in merges_text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || (i == 0 && line.starts_with("#version")) {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            return Err(load(
                merges_path,
                format!(
                    "line {}: expected two tokens separated by a space, found {line:?}",
                    i + 1
                ),
            ));
        }
        merges.push(serde_json::json!([parts[0], parts[1]]));
    }
    let bos = "<|startoftext|>";
    let eos = "<|endoftext|>";
    let id_of = |token: &str| {
        vocab
            .get(token)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| TokenizerError::MissingToken {
                path: vocab_path.clone(),
                token: token.into(),
                model: "CLIP",
            })
    };
    let (bos_id, eos_id) = (id_of(bos)?, id_of(eos)?);
    let special = |id: u64, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true})
    };
    let spec = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(bos_id, bos), special(eos_id, eos)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"},
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": eos, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": merges},
    });
    spec.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| load(dir.to_path_buf(), format!("vocab.json + merges.txt: {e}")))
}

/// A tokenizer producing fixed-length id rows for one text encoder.
#[derive(Debug)]
pub struct PromptTokenizer {
    kind: TokenizerKind,
    inner: Tokenizer,
    len: usize,
    path: PathBuf,
}

impl PromptTokenizer {
    /// Reads `tokenizer.json` at `path` for `kind`, producing rows of `len` ids.
    ///
    /// `path` may also be a tokenizer folder: its `tokenizer.json`, or for CLIP, when that is
    /// absent, its `vocab.json` + `merges.txt` (the files the FLUX.1 repositories ship in
    /// `tokenizer/`), assembled into the pipeline of the original CLIP tokenizer.
    pub fn from_file(path: &Path, kind: TokenizerKind, len: usize) -> Result<Self, TokenizerError> {
        let folder = if path.is_dir() {
            Some(path)
        } else if !path.exists() && path.file_name().is_some_and(|n| n == "tokenizer.json") {
            path.parent()
        } else {
            None
        };
        if let Some(dir) = folder {
            let json = dir.join("tokenizer.json");
            if json.is_file() {
                return Self::from_file(&json, kind, len);
            }
            if kind == TokenizerKind::Clip
                && dir.join("vocab.json").is_file()
                && dir.join("merges.txt").is_file()
            {
                let inner = clip_from_vocab_merges(dir)?;
                return Self::with_tokenizer(inner, dir, kind, len);
            }
        }
        if !path.is_file() {
            return Err(TokenizerError::Missing {
                path: path.to_path_buf(),
                hint: format!(
                    "the {} tokenizer ships as `{}/tokenizer.json` (CLIP also as `vocab.json` + `merges.txt`) in the diffusers layout of the FLUX.1 repositories; pass its path or folder",
                    kind.name(),
                    kind.folder()
                ),
            });
        }
        let inner = tokenizer_from_json(path)?;
        Self::with_tokenizer(inner, path, kind, len)
    }

    fn with_tokenizer(
        mut inner: Tokenizer,
        path: &Path,
        kind: TokenizerKind,
        len: usize,
    ) -> Result<Self, TokenizerError> {
        let pad = kind.pad_token();
        let pad_id = inner
            .token_to_id(pad)
            .ok_or_else(|| TokenizerError::MissingToken {
                path: path.to_path_buf(),
                token: pad.into(),
                model: kind.name(),
            })?;
        let len = len.max(2);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: len,
                ..TruncationParams::default()
            }))
            .map_err(|e| TokenizerError::Load {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(len),
            direction: PaddingDirection::Right,
            pad_id,
            pad_token: pad.into(),
            ..PaddingParams::default()
        }));
        Ok(Self {
            kind,
            inner,
            len,
            path: path.to_path_buf(),
        })
    }

    /// Reads the tokenizer beside a diffusers model folder (`<root>/tokenizer_2/tokenizer.json`
    /// for T5, `<root>/tokenizer/tokenizer.json` for CLIP).
    pub fn from_model_dir(
        root: &Path,
        kind: TokenizerKind,
        len: usize,
    ) -> Result<Self, TokenizerError> {
        Self::from_file(&root.join(kind.folder()).join("tokenizer.json"), kind, len)
    }

    /// Fails unless every id the tokenizer can produce indexes the model's embedding table.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<(), TokenizerError> {
        let found = self.vocab_size();
        if found > model_vocab {
            return Err(TokenizerError::VocabMismatch {
                path: self.path.clone(),
                model: self.kind.name(),
                expected: model_vocab,
                found,
            });
        }
        Ok(())
    }

    /// Number of ids (including added special tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Row length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: rows hold at least two ids.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The ids of `prompt`: special tokens added, truncated and padded to [`PromptTokenizer::len`].
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, TokenizerError> {
        // The tokenizer library panics on some post-processor templates a file can hold
        // (a special token it lists but does not define); that is an error of the file here.
        let enc = std::panic::catch_unwind(|| self.inner.encode(prompt, true))
            .map_err(|panic| {
                TokenizerError::Encode(format!(
                    "the tokenizer from {} failed ({})",
                    self.path.display(),
                    panic_message(&*panic)
                ))
            })?
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` without special tokens (for inspection and round-trip checks).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn special(id: u32, content: &str) -> String {
        format!(
            r#"{{"id":{id},"content":"{content}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
        )
    }

    /// A small T5-style unigram tokenizer: `<pad>`=0, `</s>`=1, `<unk>`=2, then pieces.
    fn t5_json() -> String {
        let pieces = ["▁", "a", "b", "c", "d", "e", "▁a", "▁ab", "cd", "▁e"];
        let vocab: Vec<String> = ["<pad>", "</s>", "<unk>"]
            .iter()
            .map(|p| format!(r#"["{p}",0.0]"#))
            .chain(
                pieces
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!(r#"["{p}",{}]"#, -1.0 - i as f64 * 0.1)),
            )
            .collect();
        let meta =
            r#"{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true}"#;
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{},{},{}],
            "normalizer":null,"pre_tokenizer":{meta},
            "post_processor":{{"type":"TemplateProcessing",
              "single":[{{"Sequence":{{"id":"A","type_id":0}}}},{{"SpecialToken":{{"id":"</s>","type_id":0}}}}],
              "pair":[{{"Sequence":{{"id":"A","type_id":0}}}},{{"Sequence":{{"id":"B","type_id":0}}}},{{"SpecialToken":{{"id":"</s>","type_id":0}}}}],
              "special_tokens":{{"</s>":{{"id":"</s>","ids":[1],"tokens":["</s>"]}}}}}},
            "decoder":{meta},
            "model":{{"type":"Unigram","unk_id":2,"vocab":[{}],"byte_fallback":false}}}}"#,
            special(0, "<pad>"),
            special(1, "</s>"),
            special(2, "<unk>"),
            vocab.join(",")
        )
    }

    /// A small CLIP-style BPE tokenizer: bos/eos around the text, eos as padding.
    fn clip_json() -> String {
        let bos = "<|startoftext|>";
        let eos = "<|endoftext|>";
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{},{}],
            "normalizer":{{"type":"Lowercase"}},"pre_tokenizer":{{"type":"Whitespace"}},
            "post_processor":{{"type":"TemplateProcessing",
              "single":[{{"SpecialToken":{{"id":"{bos}","type_id":0}}}},{{"Sequence":{{"id":"A","type_id":0}}}},{{"SpecialToken":{{"id":"{eos}","type_id":0}}}}],
              "pair":[{{"Sequence":{{"id":"A","type_id":0}}}},{{"Sequence":{{"id":"B","type_id":0}}}}],
              "special_tokens":{{"{bos}":{{"id":"{bos}","ids":[7],"tokens":["{bos}"]}},"{eos}":{{"id":"{eos}","ids":[8],"tokens":["{eos}"]}}}}}},
            "decoder":null,
            "model":{{"type":"BPE","dropout":null,"unk_token":"{eos}","continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
              "vocab":{{"a":0,"b":1,"c":2,"ab":3,"abc":4,"x":5,"y":6,"{bos}":7,"{eos}":8}},
              "merges":[["a","b"],["ab","c"]]}}}}"#,
            special(7, bos),
            special(8, eos),
        )
    }

    /// A tokenizer file in a scratch folder of its own (tests run in parallel), removed with
    /// the folder when dropped.
    struct Scratch {
        dir: tempfile::TempDir,
        file: PathBuf,
    }

    fn write(name: &str, text: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("flux-tok-{name}-"))
            .tempdir()
            .unwrap();
        let file = dir.path().join("tokenizer.json");
        std::fs::write(&file, text).unwrap();
        Scratch { dir, file }
    }

    fn t5(len: usize) -> PromptTokenizer {
        PromptTokenizer::from_file(&write("t5", &t5_json()).file, TokenizerKind::T5, len).unwrap()
    }

    #[test]
    fn t5_ends_with_eos_and_pads_to_length() {
        let t = t5(8);
        let ids = t.encode("ab cd").unwrap();
        assert_eq!(ids.len(), 8);
        let eos = ids.iter().position(|&i| i == 1).expect("has </s>");
        assert!(eos >= 2, "{ids:?}");
        assert!(ids[eos + 1..].iter().all(|&i| i == 0), "{ids:?}");
        // Empty prompt: just </s> then padding.
        assert_eq!(t.encode("").unwrap(), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        // Long prompt: truncated, still ends with </s>.
        let long = "ab ".repeat(500);
        let ids = t.encode(&long).unwrap();
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[7], 1);
        assert!(ids[..7].iter().all(|&i| i > 2));
    }

    #[test]
    fn clip_wraps_in_bos_eos_and_pads_with_eos() {
        let p = write("clip", &clip_json());
        let t = PromptTokenizer::from_file(&p.file, TokenizerKind::Clip, CLIP_LEN).unwrap();
        let ids = t.encode("ABC x ab").unwrap();
        assert_eq!(ids.len(), CLIP_LEN);
        assert_eq!(&ids[..5], &[7, 4, 5, 3, 8]);
        assert!(ids[5..].iter().all(|&i| i == 8));
        let ids = t.encode(&"x ".repeat(300)).unwrap();
        assert_eq!(ids.len(), CLIP_LEN);
        assert_eq!((ids[0], ids[76]), (7, 8));
        assert_eq!(t.encode("").unwrap()[..2], [7, 8]);
        assert!(t.check_vocab(9).is_ok());
        let err = t.check_vocab(8).unwrap_err().to_string();
        assert!(err.contains("9 ids") && err.contains("has 8"), "{err}");
    }

    #[test]
    fn clip_from_vocab_and_merges_follows_the_clip_pipeline() {
        let scratch = write("clip-vm", "");
        std::fs::remove_file(&scratch.file).unwrap();
        let dir = scratch.dir.path().to_path_buf();
        std::fs::write(
            dir.join("vocab.json"),
            r#"{"a":0,"b":1,"!":2,"a</w>":3,"b</w>":4,"!</w>":5,"ab</w>":6,"<|startoftext|>":7,"<|endoftext|>":8}"#,
        )
        .unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b</w>\n").unwrap();
        // Given the missing tokenizer.json of that folder, or the folder itself.
        for path in [dir.join("tokenizer.json"), dir.clone()] {
            let t = PromptTokenizer::from_file(&path, TokenizerKind::Clip, 10).unwrap();
            // Lower-cased, whitespace runs collapsed, punctuation split off, `</w>` ending
            // each word: "ab" merges, "ba" does not; bos/eos around, eos padding.
            assert_eq!(
                t.encode("Ab  AB! ba").unwrap(),
                vec![7, 6, 6, 5, 1, 3, 8, 8, 8, 8]
            );
        }
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
        let err = PromptTokenizer::from_file(&dir, TokenizerKind::Clip, 10).unwrap_err();
        assert!(err.to_string().contains("merges.txt"), "{err}");
        // T5 has no such fallback: the missing tokenizer.json is named.
        let err = PromptTokenizer::from_file(&dir, TokenizerKind::T5, 10).unwrap_err();
        assert!(err.to_string().contains("tokenizer"), "{err}");
    }

    /// Files on which the tokenizer library itself panics give errors here instead.
    #[test]
    fn files_the_library_panics_on_give_errors() {
        let meta = r#""decoder":{"type":"Metaspace","#;
        let broken = t5_json().replace(meta, r#""decoder":{"type":"Metaspace" "#);
        assert_ne!(broken, t5_json());
        let p = write("t5-broken-decoder", &broken);
        let err = PromptTokenizer::from_file(&p.file, TokenizerKind::T5, 8).unwrap_err();
        assert!(matches!(err, TokenizerError::Load { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        let undefined =
            t5_json().replace(r#""special_tokens":{"</s>":"#, r#""special_tokens":{"<":"#);
        assert_ne!(undefined, t5_json());
        let p = write("t5-undefined-special", &undefined);
        // It loads (the library checks the template only when encoding) but cannot encode.
        let t = PromptTokenizer::from_file(&p.file, TokenizerKind::T5, 8).unwrap();
        let err = t.encode("ab").unwrap_err();
        assert!(matches!(err, TokenizerError::Encode(_)), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let empty = tempfile::tempdir().unwrap();
        let missing = empty.path().join("no-such-dir/tokenizer.json");
        let err = PromptTokenizer::from_file(&missing, TokenizerKind::T5, 512).unwrap_err();
        assert!(err.to_string().contains("tokenizer_2"), "{err}");
        let p = write("bad", "{ not json");
        let err = PromptTokenizer::from_file(&p.file, TokenizerKind::T5, 512).unwrap_err();
        assert!(matches!(err, TokenizerError::Load { .. }), "{err}");
        // A CLIP file used for T5 lacks `<pad>`.
        let p = write("wrong", &clip_json());
        let err = PromptTokenizer::from_file(&p.file, TokenizerKind::T5, 512).unwrap_err();
        assert!(err.to_string().contains("<pad>"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_text_gives_a_full_row_of_valid_ids(s in any::<String>()) {
            let t = t5(16);
            let ids = t.encode(&s).unwrap();
            prop_assert_eq!(ids.len(), 16);
            prop_assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
            prop_assert!(ids.contains(&1));
        }

        #[test]
        fn words_of_the_alphabet_round_trip(words in proptest::collection::vec("[a-e]{1,4}", 0..6)) {
            let t = t5(64);
            let text = words.join(" ");
            let ids = t.encode(&text).unwrap();
            prop_assert_eq!(t.decode(&ids).unwrap(), text);
        }
    }
}
