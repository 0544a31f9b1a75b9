//! The ingress gateway.

/// The ingress gateway proxy.
#[derive(Debug)]
pub struct Gateway;

impl Gateway {
    /// Starts the gateway (not yet implemented in this build).
    pub async fn start(
        _settings: crate::Settings,
    ) -> Result<crate::ProxyHandle, crate::StartError> {
        Err(crate::StartError::Other(
            "gateway: not available yet".into(),
        ))
    }
}
