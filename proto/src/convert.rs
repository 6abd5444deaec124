//! Conversions between the shared value types and their protobuf form.

use crate::control::{EndpointInfo, SidecarState as PbState};
use crate::types::{AppProtocol, Endpoint, HostId, InstanceId, ServiceName, SidecarState, Source};

impl From<&Endpoint> for EndpointInfo {
    fn from(ep: &Endpoint) -> Self {
        EndpointInfo {
            instance: ep.instance.to_string(),
            host: ep.host.to_string(),
            app_address: ep.app_address.to_string(),
            pa_address: ep.pa_address.map(|a| a.to_string()).unwrap_or_default(),
            weight: ep.weight,
            protocol: ep.protocol.as_str().to_owned(),
            zone: ep.zone.clone(),
            version: ep.version.clone(),
            unhealthy: !ep.healthy,
            no_direct: ep.no_direct,
            labels: ep
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl EndpointInfo {
    /// Converts a received snapshot entry back into an [`Endpoint`] of `service`; `None` when
    /// a field does not parse (the sender is then broken, and the entry is skipped).
    pub fn to_endpoint(&self, service: &ServiceName) -> Option<Endpoint> {
        Some(Endpoint {
            service: service.clone(),
            instance: InstanceId::new(self.instance.clone()).ok()?,
            host: HostId::new(self.host.clone()).ok()?,
            app_address: self.app_address.parse().ok()?,
            pa_address: if self.pa_address.is_empty() {
                None
            } else {
                Some(self.pa_address.parse().ok()?)
            },
            protocol: AppProtocol::parse(&self.protocol)?,
            weight: self.weight.max(1),
            zone: self.zone.clone(),
            version: self.version.clone(),
            source: Source::Native,
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            healthy: !self.unhealthy,
            no_direct: self.no_direct,
        })
    }
}

impl From<SidecarState> for PbState {
    fn from(s: SidecarState) -> Self {
        match s {
            SidecarState::Starting => PbState::Starting,
            SidecarState::Ready => PbState::Ready,
            SidecarState::Draining => PbState::Draining,
            SidecarState::Stopped | SidecarState::Failed => PbState::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips_through_protobuf() {
        let ep = Endpoint {
            service: ServiceName::new("echo").unwrap(),
            instance: InstanceId::new("h1-echo").unwrap(),
            host: HostId::new("h1").unwrap(),
            app_address: "127.0.0.2:8080".parse().unwrap(),
            pa_address: Some("127.0.0.2:4143".parse().unwrap()),
            protocol: AppProtocol::Http2,
            weight: 3,
            zone: "z".into(),
            version: "1".into(),
            source: Source::Native,
            labels: [("track".to_owned(), "canary".to_owned())].into(),
            healthy: false,
            no_direct: true,
        };
        let info = EndpointInfo::from(&ep);
        assert_eq!(info.to_endpoint(&ep.service), Some(ep.clone()));
        let mut broken = info.clone();
        broken.app_address = "nope".into();
        assert_eq!(broken.to_endpoint(&ep.service), None);
    }
}
