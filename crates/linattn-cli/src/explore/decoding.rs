//! The decoding panel: per-token latency and state memory against the context length,
//! measured by `linattn decode` itself (run as a child process of this binary, alone on
//! the cores like every measurement of the page).

use super::{ApiError, Body, Shared, check_range};
use crate::decode::RECURRENT_METHODS;
use crate::method_options::MethodName;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::process::Command;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeRequest {
    methods: Vec<String>,
    prompt_len: usize,
    tokens: usize,
    heads: usize,
    dim: usize,
}

impl DecodeRequest {
    fn validate(&self) -> Result<(), String> {
        let recurrent = RECURRENT_METHODS.map(MethodName::name);
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
        check_range("methods", self.methods.len(), 1, recurrent.len())?;
        check_range("prompt_len", self.prompt_len, 1, 1 << 16)?;
        check_range("tokens", self.tokens, 1, 4096)?;
        check_range("heads", self.heads, 1, 64)?;
        check_range("dim", self.dim, 1, 256)
    }

    fn arguments(&self) -> Vec<String> {
        let mut args = vec!["decode".to_string(), "--json".to_string()];
        for (flag, value) in [
            ("--method", self.methods.join(",")),
            ("--prompt-len", self.prompt_len.to_string()),
            ("--tokens", self.tokens.to_string()),
            ("--heads", self.heads.to_string()),
            ("--dim", self.dim.to_string()),
        ] {
            args.extend([flag.to_string(), value]);
        }
        args
    }
}

pub async fn decode(State(app): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let request: DecodeRequest = super::parse(body)?;
    request
        .validate()
        .map_err(|message| ApiError(StatusCode::UNPROCESSABLE_ENTITY, message))?;
    let failed = |message: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, message);
    let output = tokio::task::spawn_blocking(move || {
        let _alone = app.jobs.measuring();
        let exe = std::env::current_exe()?;
        Command::new(exe).args(request.arguments()).output()
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| failed(format!("cannot run linattn decode: {e}")))?;
    if !output.status.success() {
        let message = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, message));
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| failed(format!("linattn decode printed no JSON: {e}")))?;
    Ok(axum::Json(report).into_response())
}
