//! Firecracker's REST API for Ember: the tools that drive Firecracker over its Unix socket
//! (SDKs, orchestrators, `curl --unix-socket`) can drive an Ember VMM unchanged.
//!
//! * [`model`]: the JSON bodies of Firecracker 1.16's OpenAPI definitions, as serde types
//!   (also Firecracker's `--config-file` format, [`model::FullVmConfiguration`]).
//! * [`parse`]: an HTTP method, path and body become an [`ApiRequest`], or the 400 answer
//!   Firecracker gives ([`RequestError`], with Firecracker's messages).
//! * [`ApiServer`]: HTTP/1.1 on a Unix socket (hyper), on a thread of its own; every parsed
//!   request is handed to the VMM as an [`ApiCall`] and answered with its [`ApiResponse`].
//!
//! The crate knows nothing of a VM: the VMM decides what each request does (the `ember`
//! binary's Firecracker mode is one such VMM).
//!
//! ```no_run
//! use ember_api::{ApiRequest, ApiResponse, ApiServer, ServerConfig};
//!
//! let server = ApiServer::bind(std::path::Path::new("/tmp/api.sock"))?;
//! let (tx, rx) = std::sync::mpsc::channel();
//! server.spawn(ServerConfig::default(), move |call| { let _ = tx.send(call); })?;
//! for call in rx {
//!     let answer = match &call.request {
//!         ApiRequest::GetVersion => ApiResponse::ok(&ember_api::model::FirecrackerVersion {
//!             firecracker_version: "1.16.1".into(),
//!         }),
//!         _ => ApiResponse::bad_request("not here"),
//!     };
//!     call.reply(answer);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod model;
mod request;
mod server;

pub use request::{parse, ApiRequest, ApiResponse, RequestError};
pub use server::{
    ApiCall, ApiServer, ServerConfig, ServerCounters, ServerError, DEFAULT_MAX_PAYLOAD,
};
