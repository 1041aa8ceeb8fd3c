//! Facts of the gRPC API that the gateway and its clients share, kept beside the
//! generated types so that client code (the CLI's commands) needs nothing from the
//! server's modules.

use super::TaskStatus;

/// The request metadata key of a bearer token (`authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

impl TaskStatus {
    /// The task has ended: done, failed, a client error, interrupted (which a late
    /// result may still turn into done) or cancelled. Unspecified is not an end.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Done
                | TaskStatus::Failed
                | TaskStatus::ClientError
                | TaskStatus::Interrupted
                | TaskStatus::Cancelled
        )
    }
}
