//! API keys: where they come from (flags, environment, a keys file), their quotas and rate
//! limits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// One API key and its limits.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyConfig {
    /// The key, as sent in `x-api-key`.
    pub key: String,
    /// Credits (one per request) the key may use in all; `None`: unlimited.
    pub quota: Option<u64>,
    /// Requests per second allowed (bursts up to one second's worth); `None`: unlimited.
    pub rate: Option<f64>,
    /// Models the key may use; `None`: all.
    pub models: Option<Vec<String>>,
}

impl KeyConfig {
    /// An unlimited key.
    pub fn unlimited(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            quota: None,
            rate: None,
            models: None,
        }
    }

    /// Whether the key may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// An error in a keys file or key option.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}:{line}: {message}")]
pub struct KeyFileError {
    /// The file (or option) the key came from.
    pub source_name: String,
    /// Line number (1-based).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses one key line: `KEY [quota=N] [rate=N/s] [models=a,b]`.
pub fn parse_key_line(line: &str) -> Result<KeyConfig, String> {
    let mut parts = line.split_whitespace();
    let key = parts.next().ok_or("empty line")?;
    if key.contains('=') {
        return Err(format!(
            "'{key}' looks like an option; the line must start with the key"
        ));
    }
    let mut cfg = KeyConfig::unlimited(key);
    for part in parts {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}': expected quota=N, rate=N/s or models=a,b"))?;
        match name {
            "quota" => {
                cfg.quota =
                    Some(value.parse().map_err(|_| {
                        format!("quota '{value}': expected a whole number of credits")
                    })?);
            }
            "rate" => {
                let n = value.strip_suffix("/s").unwrap_or(value);
                let r: f64 = n
                    .parse()
                    .map_err(|_| format!("rate '{value}': expected N/s, e.g. rate=5/s"))?;
                if !(r.is_finite() && r > 0.0) {
                    return Err(format!(
                        "rate '{value}': must be a positive number per second"
                    ));
                }
                cfg.rate = Some(r);
            }
            "models" => {
                cfg.models = Some(value.split(',').map(str::to_string).collect());
            }
            _ => {
                return Err(format!(
                    "unknown option '{name}': expected quota=N, rate=N/s or models=a,b"
                ));
            }
        }
    }
    Ok(cfg)
}

/// Parses a keys file's text: one key per line, `#` comments and blank lines skipped.
pub fn parse_keys(text: &str, source_name: &str) -> Result<Vec<KeyConfig>, KeyFileError> {
    let mut keys = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        keys.push(parse_key_line(line).map_err(|message| KeyFileError {
            source_name: source_name.to_string(),
            line: i + 1,
            message,
        })?);
    }
    Ok(keys)
}

/// Reads a keys file.
pub fn load_keys_file(path: &Path) -> Result<Vec<KeyConfig>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| KeyFileError {
        source_name: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    })?;
    parse_keys(&text, &path.display().to_string())
}

/// Per-key token buckets.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// Takes one token of `key` (refilled at `rate` per second, at most `max(rate, 1)` stored);
    /// `Err(seconds)` until one is available.
    pub fn check(&self, key: &str, rate: f64) -> Result<(), u64> {
        let burst = rate.max(1.0);
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_parse_and_errors_name_the_line() {
        let keys = parse_keys(
            "# comment\nk1\nk2 quota=3 rate=2/s\n\nk3 models=flux-img2img rate=0.5\n",
            "keys.txt",
        )
        .unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0], KeyConfig::unlimited("k1"));
        assert_eq!(keys[1].quota, Some(3));
        assert_eq!(keys[1].rate, Some(2.0));
        assert!(keys[2].allows("flux-img2img"));
        assert!(!keys[2].allows("other"));
        let e = parse_keys("ok\nbad quota=x\n", "keys.txt").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("keys.txt:2"), "{e}");
        assert!(parse_keys("k rate=-1/s", "f").is_err());
        assert!(parse_keys("k colour=red", "f").is_err());
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_refuses() {
        let rl = RateLimiter::default();
        assert!(rl.check("a", 2.0).is_ok());
        assert!(rl.check("a", 2.0).is_ok());
        let wait = rl.check("a", 2.0).unwrap_err();
        assert!(wait >= 1);
        // Other keys have their own bucket.
        assert!(rl.check("b", 2.0).is_ok());
    }
}
