//! The decoding panel: per-token latency and state memory against the context length,
//! measured by `linattn decode` itself (run as a watched child process of this binary,
//! alone on the cores like every measurement of the page).

use super::supervise::{self, CancelOnDrop, Ended};
use super::{ApiError, Body, Shared, check_range};
use crate::decode::recurrent_methods;
use crate::gates::Gate;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use linattn::ByteSize;
use serde::Deserialize;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeRequest {
    methods: Vec<String>,
    prompt_len: usize,
    tokens: usize,
    heads: usize,
    dim: usize,
    /// gla, gated-delta-rule: `linattn decode --gate`.
    #[serde(default)]
    gate: Option<Gate>,
}

impl DecodeRequest {
    fn validate(&self) -> Result<(), String> {
        let recurrent: Vec<&str> = recurrent_methods().iter().map(|m| m.name()).collect();
        if let Some(unknown) = self
            .methods
            .iter()
            .find(|m| !recurrent.contains(&m.as_str()))
        {
            return Err(format!(
                "{unknown} has no recurrent form to decode with; choose from {}",
                recurrent.join(", ")
            ));
        }
        super::no_duplicates(self.methods.iter().map(String::as_str))?;
        check_range("methods", self.methods.len(), 1, recurrent.len())?;
        check_range("prompt_len", self.prompt_len, 1, 1 << 16)?;
        check_range("tokens", self.tokens, 1, 4096)?;
        check_range("heads", self.heads, 1, 64)?;
        check_range("dim", self.dim, 1, 256)
    }

    fn arguments(&self, memory_budget: u64) -> Vec<String> {
        let mut args = vec!["decode".to_string(), "--json".to_string()];
        for (flag, value) in [
            ("--method", self.methods.join(",")),
            ("--prompt-len", self.prompt_len.to_string()),
            ("--tokens", self.tokens.to_string()),
            ("--heads", self.heads.to_string()),
            ("--dim", self.dim.to_string()),
            ("--memory-limit", memory_budget.to_string()),
        ] {
            args.extend([flag.to_string(), value]);
        }
        if let Some(gate) = self.gate {
            args.extend(["--gate".to_string(), gate.name().to_string()]);
        }
        args
    }
}

/// Runs `linattn decode` as a watched child: stopped past the server's time limit or
/// memory budget, and as soon as the client goes away (axum drops this future, and with
/// it the guard that cancels the child).
pub async fn decode(State(app): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let request: DecodeRequest = super::parse(body)?;
    request
        .validate()
        .map_err(|message| ApiError(StatusCode::UNPROCESSABLE_ENTITY, message))?;
    let failed = |message: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, message);
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(Arc::clone(&cancel));
    let limits = app.limits;
    let (ended, stdout) = tokio::task::spawn_blocking(move || {
        let _alone = app.jobs.measuring();
        let mut command = Command::new(std::env::current_exe()?);
        command.args(request.arguments(limits.memory_budget));
        let watch = supervise::Limits {
            cancel: &cancel,
            memory_budget: limits.memory_budget,
        };
        let mut stdout = String::new();
        let time_limit = Some(Duration::from_secs_f64(limits.case_seconds));
        let ended = supervise::run(command, &[], &watch, time_limit, |line| {
            stdout.push_str(line);
            None
        });
        Ok::<_, std::io::Error>((ended, stdout))
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| failed(format!("cannot run linattn decode: {e}")))?;
    let refused = |message: String| Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, message));
    match ended {
        Ended::Exited { success: true, .. } => {}
        Ended::Exited { stderr, .. } => return refused(stderr),
        Ended::TimedOut(limit) => {
            return refused(format!(
                "stopped after {} s, the server's time limit (--case-seconds)",
                limit.as_secs_f64()
            ));
        }
        Ended::OverBudget(held) => {
            return refused(format!(
                "stopped holding {}, over the server's memory budget of {}",
                ByteSize(held as u128),
                ByteSize(limits.memory_budget as u128)
            ));
        }
        Ended::Cancelled => return Err(failed("the decoding run was cancelled".into())),
        Ended::Failed(message) => return Err(failed(message)),
    }
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .map_err(|e| failed(format!("linattn decode printed no JSON: {e}")))?;
    Ok(axum::Json(report).into_response())
}
