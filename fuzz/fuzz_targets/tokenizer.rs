//! Arbitrary prompt text through the prompt tokenizers, and arbitrary bytes as a
//! `tokenizer.json`: every prompt gives rows of exactly the requested length (or an error), and a
//! malformed tokenizer file is an error, never a panic.
#![no_main]

use flux_model::tokenizer::{CLIP_LEN, PromptTokenizer, TokenizerKind};
use flux_pipeline::demo::ByteTokenizer;
use flux_pipeline::model::PromptTokenizer as _;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A small T5-style unigram tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, then pieces).
const T5_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[
 {"id":0,"content":"<pad>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
 {"id":1,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
 {"id":2,"content":"<unk>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,
"pre_tokenizer":{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true},
"post_processor":{"type":"TemplateProcessing",
 "single":[{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"</s>","type_id":0}}],
 "pair":[{"Sequence":{"id":"A","type_id":0}},{"Sequence":{"id":"B","type_id":0}},{"SpecialToken":{"id":"</s>","type_id":0}}],
 "special_tokens":{"</s>":{"id":"</s>","ids":[1],"tokens":["</s>"]}}},
"decoder":{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true},
"model":{"type":"Unigram","unk_id":2,"vocab":[["<pad>",0.0],["</s>",0.0],["<unk>",0.0],
 ["▁",-1.0],["a",-1.1],["b",-1.2],["c",-1.3],["▁a",-1.4],["▁ab",-1.5],["cd",-1.6]],
 "byte_fallback":false}}"#;

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("flux-fuzz-tokenizer-{}", std::process::id()))
}

fn t5() -> &'static PromptTokenizer {
    static T5: OnceLock<PromptTokenizer> = OnceLock::new();
    T5.get_or_init(|| {
        let dir = scratch();
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let path = dir.join("t5.json");
        std::fs::write(&path, T5_JSON).expect("write tokenizer");
        PromptTokenizer::from_file(&path, TokenizerKind::T5, 16).expect("valid tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        // The bytes as a tokenizer file: an error or a tokenizer, never a panic.
        let path = scratch().join("input.json");
        if std::fs::create_dir_all(scratch()).is_ok() && std::fs::write(&path, rest).is_ok() {
            for kind in [TokenizerKind::T5, TokenizerKind::Clip] {
                if let Ok(t) = PromptTokenizer::from_file(&path, kind, CLIP_LEN) {
                    if let Ok(ids) = t.encode("a photo of a cat") {
                        assert_eq!(ids.len(), CLIP_LEN);
                    }
                }
            }
        }
        return;
    }
    let prompt = String::from_utf8_lossy(rest);
    if let Ok(ids) = t5().encode(&prompt) {
        assert_eq!(ids.len(), 16);
    }
    let (t5_ids, clip_ids) = ByteTokenizer
        .tokenize(&prompt)
        .expect("the demo tokenizer is total");
    assert_eq!(t5_ids.len(), flux_pipeline::demo::T5_LEN);
    assert_eq!(clip_ids.len(), 77);
});
