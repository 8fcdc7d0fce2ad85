//! A layer on the agent's Kubernetes client that sets `sluice_k8s_watch_up` from the answers to
//! watch requests.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::watch_metrics::WatchMetrics;

/// Sets `sluice_k8s_watch_up` from the answers to watch requests: the watcher yields nothing
/// when a watch is (re)established, only when an object changes or something fails.
pub struct WatchProbeLayer(pub WatchMetrics);

impl<S> tower::Layer<S> for WatchProbeLayer {
    type Service = WatchProbe<S>;
    fn layer(&self, inner: S) -> WatchProbe<S> {
        WatchProbe {
            inner,
            watches: self.0.clone(),
        }
    }
}

pub struct WatchProbe<S> {
    inner: S,
    watches: WatchMetrics,
}

/// The resource a watch request is for (`…/services?watch=true&…`), from the agent's three.
fn watched_resource(uri: &http::Uri) -> Option<&'static str> {
    let watching = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
    if !watching {
        return None;
    }
    match uri.path().rsplit('/').next()? {
        "services" => Some("services"),
        "endpointslices" => Some("endpointslices"),
        "nodes" => Some("nodes"),
        _ => None,
    }
}

impl<S, ReqBody, RespBody> tower::Service<http::Request<ReqBody>> for WatchProbe<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<RespBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RespBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let resource = watched_resource(request.uri());
        let response = self.inner.call(request);
        let watches = self.watches.clone();
        Box::pin(async move {
            let response = response.await;
            if let Some(resource) = resource {
                let ok = matches!(&response, Ok(r) if r.status().is_success());
                watches.set_up(resource, ok);
            }
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::watched_resource;

    #[test]
    fn only_watches_of_the_three_resources_count() {
        let r = |uri: &str| watched_resource(&uri.parse().expect("uri"));
        assert_eq!(
            r(
                "/api/v1/services?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=12"
            ),
            Some("services")
        );
        assert_eq!(
            r(
                "/apis/discovery.k8s.io/v1/endpointslices?labelSelector=kubernetes.io%2Fservice-name&watch=true"
            ),
            Some("endpointslices")
        );
        assert_eq!(r("/api/v1/nodes?watch=true"), Some("nodes"));
        // Lists, and watches of anything else, are not the watches' state.
        assert_eq!(r("/api/v1/nodes?limit=500"), None);
        assert_eq!(r("/api/v1/pods?watch=true"), None);
        assert_eq!(r("/api/v1/nodes"), None);
    }
}
