//! Results of parity cases.

use std::fmt;

/// Outcome of one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Within tolerance.
    Pass,
    /// Outside tolerance, or the case could not be run.
    Fail,
    /// Not run (kind not handled, or not possible on this backend); never counted as passed.
    Skipped,
}

/// The result of one parity case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// Largest absolute error over everything compared.
    pub max_abs: f64,
    /// Largest relative error over everything compared.
    pub max_rel: f64,
    /// Pass, fail or skipped.
    pub outcome: Outcome,
    /// Why it failed or was skipped (empty on a pass).
    pub detail: String,
}

impl CaseResult {
    /// A case that was not run.
    pub fn skipped(name: &str, why: &str) -> Self {
        Self {
            name: name.into(),
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            outcome: Outcome::Skipped,
            detail: why.into(),
        }
    }

    /// A case that could not be run or failed for a reason other than tolerance.
    pub fn failed(name: &str, why: &str) -> Self {
        Self {
            name: name.into(),
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            outcome: Outcome::Fail,
            detail: why.into(),
        }
    }

    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Pass
    }
}

impl fmt::Display for CaseResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skipped => "SKIP",
        };
        write!(
            f,
            "{}  max_abs={:.3e}  max_rel={:.3e}  {tag}",
            self.name, self.max_abs, self.max_rel
        )?;
        if !self.detail.is_empty() {
            write!(f, "  ({})", self.detail)?;
        }
        Ok(())
    }
}

/// The report lines of every case that did not pass (failed or skipped), for test messages.
pub fn failure_lines(results: &[CaseResult]) -> Vec<String> {
    results
        .iter()
        .filter(|r| !r.passed())
        .map(ToString::to_string)
        .collect()
}

/// Counts over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Cases skipped.
    pub skipped: usize,
}

impl Summary {
    /// Tallies a list of results.
    pub fn of(results: &[CaseResult]) -> Self {
        let mut s = Self::default();
        for r in results {
            match r.outcome {
                Outcome::Pass => s.passed += 1,
                Outcome::Fail => s.failed += 1,
                Outcome::Skipped => s.skipped += 1,
            }
        }
        s
    }
}

/// Tracks the largest absolute and relative error over many comparisons, and whether every
/// element was within `abs_tol + rel_tol * |reference|`.
#[derive(Clone, Debug)]
pub struct ErrorStats {
    /// Largest |actual - reference|.
    pub max_abs: f64,
    /// Largest |actual - reference| / |reference| (over elements with a non-zero reference).
    pub max_rel: f64,
    /// First element that was out of tolerance, as a message.
    pub first_violation: Option<String>,
}

impl Default for ErrorStats {
    fn default() -> Self {
        Self {
            max_abs: 0.0,
            max_rel: 0.0,
            first_violation: None,
        }
    }
}

impl ErrorStats {
    /// Compares `actual` with `reference` elementwise. NaN matches NaN only.
    pub fn compare(
        &mut self,
        what: &str,
        actual: &[f64],
        reference: &[f64],
        rel_tol: f64,
        abs_tol: f64,
    ) {
        if actual.len() != reference.len() {
            self.first_violation.get_or_insert_with(|| {
                format!(
                    "{what}: {} values, reference has {}",
                    actual.len(),
                    reference.len()
                )
            });
            return;
        }
        for (i, (&a, &r)) in actual.iter().zip(reference).enumerate() {
            if r.is_nan() || a.is_nan() {
                if !(r.is_nan() && a.is_nan()) {
                    self.first_violation
                        .get_or_insert_with(|| format!("{what}[{i}]: {a} vs reference {r}"));
                }
                continue;
            }
            let d = (a - r).abs();
            self.max_abs = self.max_abs.max(d);
            if r != 0.0 {
                self.max_rel = self.max_rel.max(d / r.abs());
            }
            if d > abs_tol + rel_tol * r.abs() || !d.is_finite() {
                self.first_violation
                    .get_or_insert_with(|| format!("{what}[{i}]: {a:e} vs reference {r:e}"));
            }
        }
    }

    /// Records a non-numeric mismatch (count, order, missing tensor).
    pub fn violation(&mut self, message: String) {
        self.first_violation.get_or_insert(message);
    }

    /// Turns the stats into a case result.
    pub fn finish(self, name: &str) -> CaseResult {
        let (outcome, detail) = match self.first_violation {
            None => (Outcome::Pass, String::new()),
            Some(m) => (Outcome::Fail, m),
        };
        CaseResult {
            name: name.into(),
            max_abs: self.max_abs,
            max_rel: self.max_rel,
            outcome,
            detail,
        }
    }
}
