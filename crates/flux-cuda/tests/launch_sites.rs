//! The backend's kernel launches, read from its own source, against the kernels' parameter
//! lists in the PTX that NVRTC makes: each call of `launch`, `unary` (which prepends the output
//! and input pointers) and `reduce` (which appends the partial-sums pointer) whose kernel name
//! and argument list are written out at the call site must pass as many arguments as the kernel
//! takes, each of the type its slot declares. This checks, without a GPU, what the launch helper
//! also checks at run time on one. Launches built from runtime lists (`launch(name, cfg,
//! &args)`) are listed and left to that run-time check.

use flux_cuda::kernels::{ParamType, include_paths_from_env};
use flux_cuda::{compile_kernels, nvrtc_available};
use std::collections::HashMap;
use std::path::Path;

/// Splits `s` (the text after an opening parenthesis) at its top-level commas up to the
/// matching closing parenthesis.
fn call_args(s: &str) -> Vec<String> {
    let mut depth = 0i32;
    let mut in_str = false;
    let mut prev = ' ';
    let mut args = Vec::new();
    let mut cur = String::new();
    for c in s.chars() {
        if in_str {
            cur.push(c);
            if c == '"' && prev != '\\' {
                in_str = false;
            }
            prev = c;
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => {
                if !cur.trim().is_empty() {
                    args.push(cur.trim().to_string());
                }
                return args;
            }
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                args.push(cur.trim().to_string());
                cur.clear();
                prev = c;
                continue;
            }
            _ => {}
        }
        cur.push(c);
        prev = c;
    }
    args
}

/// The kernel names a name expression stands for: a literal, or a `format!` whose one
/// placeholder ends the name (the dtype suffix); `None` for anything else.
fn kernel_names(expr: &str) -> Option<Vec<String>> {
    let expr = expr.trim_start_matches('&');
    if let Some(lit) = expr.strip_prefix('"') {
        return lit.strip_suffix('"').map(|n| vec![n.to_string()]);
    }
    let inner = expr.strip_prefix("format!(\"")?;
    let (fmt, _) = inner.split_once('"')?;
    let (base, rest) = fmt.split_once('{')?;
    if !rest.ends_with('}') || rest.contains('{') {
        return None;
    }
    // `name_{s}`: the dtype suffix; `name_d{d}`: the tensor-core attention's head dims.
    let values: &[&str] = if base.ends_with("_d") {
        &["16", "32", "64", "128"]
    } else if base.ends_with('_') {
        &["f32", "f64"]
    } else {
        return None;
    };
    Some(values.iter().map(|s| format!("{base}{s}")).collect())
}

/// The parameter types of a written-out argument list `&[ ... ]`; `Err` names an argument
/// expression the checker does not recognise, `Ok(None)` a list that is not written out.
fn arg_types(expr: &str) -> Result<Option<Vec<ParamType>>, String> {
    let Some(list) = expr.strip_prefix("&[") else {
        return Ok(None);
    };
    call_args(list)
        .iter()
        .map(|a| {
            let kinds = [
                ("Arg::Buf(", ParamType::Bits64),
                ("Arg::U64(", ParamType::Bits64),
                ("u(", ParamType::Bits64),
                ("Arg::I32(", ParamType::Int32),
                ("flag(", ParamType::Int32),
                ("Arg::F32(", ParamType::F32),
                ("Arg::F64(", ParamType::F64),
            ];
            kinds
                .iter()
                .find(|(prefix, _)| a.starts_with(prefix))
                .map(|&(_, t)| t)
                .ok_or_else(|| format!("unrecognised kernel argument `{a}`"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

struct Site {
    at: String,
    names: Vec<String>,
    args: Vec<ParamType>,
}

/// Every call site of the three launch helpers in `src`, with the site's position.
fn sites(file: &str, src: &str, sites: &mut Vec<Site>, dynamic: &mut Vec<String>) {
    for (helper, prefix, suffix, args_at) in [
        ("self.launch(", &[][..], &[][..], 2),
        (
            "self.unary(",
            &[ParamType::Bits64, ParamType::Bits64][..],
            &[][..],
            3,
        ),
        ("self.reduce(", &[][..], &[ParamType::Bits64][..], 2),
    ] {
        for (pos, _) in src.match_indices(helper) {
            let line = src[..pos].lines().count();
            let at = format!("{file}:{line}");
            let args = call_args(&src[pos + helper.len()..]);
            let (Some(name), Some(list)) = (args.first(), args.get(args_at)) else {
                dynamic.push(at);
                continue;
            };
            match (kernel_names(name), arg_types(list)) {
                (Some(names), Ok(Some(mid))) => sites.push(Site {
                    at,
                    names,
                    args: [prefix, &mid[..], suffix].concat(),
                }),
                (_, Err(e)) => panic!("{at}: {e}"),
                _ => dynamic.push(at),
            }
        }
    }
}

#[test]
fn call_arguments_are_split_at_top_level_commas() {
    assert_eq!(
        call_args("&format!(\"a_{s}\"), cfg(1, 2), &[u(n), Arg::Buf(&x[0..2])]) rest"),
        [
            "&format!(\"a_{s}\")",
            "cfg(1, 2)",
            "&[u(n), Arg::Buf(&x[0..2])]"
        ]
    );
    assert_eq!(
        kernel_names("&format!(\"rms_norm_{s}\")"),
        Some(vec!["rms_norm_f32".into(), "rms_norm_f64".into()])
    );
    assert_eq!(
        kernel_names("\"narrow_f32_to_bf16\""),
        Some(vec!["narrow_f32_to_bf16".into()])
    );
    assert_eq!(
        kernel_names("&format!(\"attention_tc_d{d}\")").map(|v| v.len()),
        Some(4)
    );
    assert_eq!(kernel_names("&format!(\"{src}_{s}\")"), None);
    assert_eq!(kernel_names("name"), None);
    assert_eq!(
        arg_types("&[Arg::Buf(&o), u(n), flag(b), Arg::F64(e), Arg::F32(s)]"),
        Ok(Some(vec![
            ParamType::Bits64,
            ParamType::Bits64,
            ParamType::Int32,
            ParamType::F64,
            ParamType::F32
        ]))
    );
    assert_eq!(arg_types("&args"), Ok(None));
    assert!(arg_types("&[mystery(3)]").is_err());
}

#[test]
#[cfg_attr(
    not(flux_require_nvrtc),
    ignore = "needs NVRTC: set FLUX_REQUIRE_NVRTC=1 (CI does) with libnvrtc on LD_LIBRARY_PATH"
)]
fn written_out_launches_match_the_kernel_parameters() {
    assert!(nvrtc_available(), "NVRTC is not on the loader path");
    let compiled = compile_kernels("compute_80", &include_paths_from_env())
        .unwrap_or_else(|e| panic!("compute_80: {e}"));
    let params: HashMap<String, Vec<ParamType>> = compiled
        .into_iter()
        .flat_map(|f| f.entries)
        .map(|e| (e.name, e.params))
        .collect();
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    let mut dynamic = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&src_dir)
        .expect("reading src")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    for path in files {
        let src = std::fs::read_to_string(&path).expect("reading a source file");
        let file = path
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        sites(&file, &src, &mut all, &mut dynamic);
    }
    let mut problems = Vec::new();
    for site in &all {
        for name in &site.names {
            match params.get(name) {
                None => problems.push(format!("{}: no kernel {name} in the PTX", site.at)),
                Some(p) if *p != site.args => problems.push(format!(
                    "{}: {name} takes {p:?}, the call passes {:?}",
                    site.at, site.args
                )),
                Some(_) => {}
            }
        }
    }
    println!(
        "{} launch sites checked; left to the run-time check: {}",
        all.len(),
        dynamic.join(", ")
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The checker must keep seeing the backend's launches (a renamed helper would hide them).
    assert!(all.len() >= 20, "only {} launch sites found", all.len());
}
