//! The error type of `pinion-plan`.

/// Why a budget could not be parsed, a plan made, or a profile or plan read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The budget does not cover what a run needs in any case.
    #[error(
        "memory budget {} is too small: this model needs at least {} ({detail}); raise --mem-budget to {} or more{}",
        mib(*budget), mib(*minimum), mib(*minimum), context_hint(*kv, *minimum)
    )]
    BudgetTooSmall {
        /// The budget, bytes.
        budget: u64,
        /// The smallest budget that runs, bytes.
        minimum: u64,
        /// What the minimum is made of.
        detail: String,
        /// The KV cache's part of the minimum (the part a smaller context shrinks).
        kv: u64,
    },
    /// A budget string could not be parsed.
    #[error("cannot parse budget {input:?}: {why} (examples: 48MiB, 64M, 1.5GiB, 123456, 50%)")]
    BadBudget {
        /// The string.
        input: String,
        /// What is wrong.
        why: String,
    },
    /// The planner's input is inconsistent.
    #[error("invalid plan input: {why}")]
    BadInput {
        /// What is wrong.
        why: String,
    },
    /// The device profile lacks measurements the planner needs.
    #[error("device profile is incomplete: {why}")]
    IncompleteProfile {
        /// What is missing.
        why: String,
    },
    /// A serialized profile or plan is not one, or a field is missing or of the wrong type.
    #[error("{what}: {why}")]
    BadFile {
        /// Where it came from (a path, for messages).
        what: String,
        /// What is wrong.
        why: String,
    },
    /// A serialized profile or plan of another version.
    #[error("{what}: version {found}, this pinion reads version {expected}")]
    Version {
        /// Where it came from.
        what: String,
        /// The version found.
        found: u64,
        /// The version this code reads.
        expected: u64,
    },
}

/// `bytes` in MiB with one decimal, for messages.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// When the KV cache is a third or more of the minimum, the other way out: a smaller context.
fn context_hint(kv: u64, minimum: u64) -> String {
    match kv * 3 >= minimum {
        true => format!(", or lower the context with -c (its KV cache takes {})", mib(kv)),
        false => String::new(),
    }
}
