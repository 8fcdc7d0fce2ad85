//! A real Kubernetes API server for the agent's tests and benchmark: etcd and kube-apiserver 1.20
//! (built from Debian's source package by `scripts/kube-apiserver.sh`, cached outside the repo),
//! started on free loopback ports, optionally inside a network namespace (the lab's lb namespace,
//! where the agent runs), with a temp dir for certificates, keys, tokens and data.
//!
//! 1.20 serves EndpointSlice only as discovery.k8s.io/v1beta1; current clusters (and the agent)
//! use v1. The server is started with v1beta1 off and a CRD for `endpointslices.discovery.k8s.io`
//! v1 is registered: the server stores and watches v1 slices with its real machinery. No controller
//! writes them, so tests create slices themselves, as the EndpointSlice controller would. The CRD
//! also serves the same objects as v1beta1 (conversion None: the apiVersion alone changes), which
//! is what kube-proxy 1.20 reads in the cluster harness (the only way its IPv6 proxier gets
//! endpoints: 1.20's Endpoints hold one family).
//!
//! Everything (processes, temp dir) is removed when the [`Kube`] is dropped, also during a panic.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd;
use crate::netns;

/// The agent's namespace and ServiceAccount, as shipped in deploy/.
pub const AGENT_NAMESPACE: &str = "sluice-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "sluice";

/// How long the API server may take to answer /readyz after start (~4 s when the host is quiet).
const START_TIMEOUT: Duration = Duration::from_secs(90);

static KUBE_COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: std::sync::Once = std::sync::Once::new();

const ENDPOINTSLICE_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: endpointslices.discovery.k8s.io
  annotations:
    api-approved.kubernetes.io: "https://github.com/kubernetes/kubernetes/pull/99662"
spec:
  group: discovery.k8s.io
  scope: Namespaced
  names: {plural: endpointslices, singular: endpointslice, kind: EndpointSlice, listKind: EndpointSliceList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
    - name: v1beta1
      served: true
      storage: false
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
"#;

/// The repository root (for scripts/ and deploy/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The kustomize overlays under deploy/overlays/, by name.
pub fn overlays() -> Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(repo_root().join("deploy/overlays"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    Ok(names)
}

/// The directory holding `kube-apiserver` and `kubectl`: builds them on first use (minutes, once
/// per machine) with scripts/kube-apiserver.sh, which answers at once when they are cached.
pub fn binaries() -> Result<PathBuf> {
    let script = repo_root().join("scripts/kube-apiserver.sh");
    let out = cmd::run_ok(&mut Command::new(&script), Duration::from_secs(1800))
        .context("building or finding kube-apiserver (scripts/kube-apiserver.sh)")?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ensure!(
        dir.join("kube-apiserver").is_file() && dir.join("kubectl").is_file(),
        "{} printed {}, which holds no kube-apiserver and kubectl",
        script.display(),
        dir.display()
    );
    Ok(dir)
}

/// One kube-apiserver process (several may share the etcd).
struct ApiServer {
    port: u16,
    cert_dir: PathBuf,
    kubeconfig: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// etcd + kube-apiserver(s). See the module documentation.
pub struct Kube {
    netns: Option<String>,
    /// Where the API servers listen besides loopback (the clients' server address); `None`:
    /// loopback only.
    listen: Option<Ipv4Addr>,
    /// Serving a whole cluster (kubelets, pods): see [`Kube::start_cluster`].
    cluster: bool,
    /// Dual-stack Services allowed: see [`Kube::start_dual_stack`].
    dual_stack: bool,
    /// `--service-node-port-range`, when not the default 30000-32767: see [`Kube::start_many_ports`].
    node_port_range: Option<&'static str>,
    dir: PathBuf,
    bin: PathBuf,
    etcd_port: u16,
    etcd_peer_port: u16,
    etcd: Option<Child>,
    servers: Vec<ApiServer>,
    admin_token: String,
    seq: AtomicU32,
}

impl Kube {
    /// Starts etcd and one API server (index 0), inside network namespace `netns` when given (its
    /// loopback must be up), and registers the EndpointSlice v1 CRD.
    pub fn start(netns: Option<&str>) -> Result<Kube> {
        Self::start_with(netns, None)
    }

    /// As [`Kube::start`], the API servers listening on every address of the namespace and the
    /// kubeconfigs naming `listen` (one of its addresses), so that agents in other namespaces
    /// reach them over the lab's segment.
    pub fn start_listening(netns: &str, listen: Ipv4Addr) -> Result<Kube> {
        Self::start_with(Some(netns), Some(listen))
    }

    /// As [`Kube::start_listening`], for a whole cluster (kubelets, pods): privileged pods
    /// allowed, kubelets reached by their InternalIP, and the `kubernetes` Service's Endpoints
    /// naming `listen`, so that pods reach the API at its cluster IP. Dual-stack, as
    /// [`Kube::start_dual_stack`].
    pub fn start_cluster(netns: &str, listen: Ipv4Addr) -> Result<Kube> {
        let mut kube = Self::new(Some(netns), Some(listen))?;
        kube.cluster = true;
        kube.dual_stack = true;
        kube.setup().context("starting etcd and kube-apiserver")?;
        Ok(kube)
    }

    /// As [`Kube::start`], with dual-stack Services: Kubernetes 1.20 has them behind the
    /// `IPv6DualStack` feature gate (alpha; beta and on by default from 1.21) and needs a
    /// service range of each family for `ipFamilies: [IPv4, IPv6]` / `RequireDualStack`.
    pub fn start_dual_stack(netns: Option<&str>) -> Result<Kube> {
        let mut kube = Self::new(netns, None)?;
        kube.dual_stack = true;
        kube.setup()
            .context("starting etcd and a dual-stack kube-apiserver")?;
        Ok(kube)
    }

    /// As [`Kube::start`], with room for tens of thousands of LoadBalancer Service ports: each
    /// takes a NodePort, and the default range holds 2,768 of them (nothing in the lab listens
    /// on NodePorts: no kube-proxy runs there).
    pub fn start_many_ports(netns: Option<&str>) -> Result<Kube> {
        let mut kube = Self::new(netns, None)?;
        kube.node_port_range = Some("20000-65000");
        kube.setup().context("starting etcd and kube-apiserver")?;
        Ok(kube)
    }

    fn start_with(netns: Option<&str>, listen: Option<Ipv4Addr>) -> Result<Kube> {
        let mut kube = Self::new(netns, listen)?;
        kube.setup().context("starting etcd and kube-apiserver")?;
        Ok(kube)
    }

    fn new(netns: Option<&str>, listen: Option<Ipv4Addr>) -> Result<Kube> {
        let bin = binaries()?;
        STALE_CLEANUP.call_once(cleanup_stale);
        let pid = std::process::id();
        let n = KUBE_COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("sluice-kube-{pid}-{n}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports = free_ports(netns, 2)?;
        let kube = Kube {
            netns: netns.map(str::to_owned),
            listen,
            cluster: false,
            dual_stack: false,
            node_port_range: None,
            dir,
            bin,
            etcd_port: ports[0],
            etcd_peer_port: ports[1],
            etcd: None,
            servers: Vec::new(),
            admin_token: format!("admin-{pid}-{n}-{:x}", random_u64()),
            seq: AtomicU32::new(0),
        };
        Ok(kube)
    }

    fn setup(&mut self) -> Result<()> {
        cmd::run_ok(
            Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(self.dir.join("sa.key"))
                .arg("2048"),
            cmd::DEFAULT_TIMEOUT,
        )?;
        cmd::run_ok(
            Command::new("openssl")
                .args(["rsa", "-pubout", "-in"])
                .arg(self.dir.join("sa.key"))
                .arg("-out")
                .arg(self.dir.join("sa.pub")),
            cmd::DEFAULT_TIMEOUT,
        )?;
        fs::write(
            self.dir.join("tokens.csv"),
            format!("{},admin,1,\"system:masters\"\n", self.admin_token),
        )?;
        self.start_etcd()?;
        self.add_apiserver()?;
        self.apply_yaml(ENDPOINTSLICE_CRD)?;
        self.kubectl_ok(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout",
            "60s",
            "crd/endpointslices.discovery.k8s.io",
        ])?;
        // The CRD's discovery takes a moment to reach every handler.
        self.retry("listing v1 EndpointSlices", || {
            self.kubectl_ok(&["get", "endpointslices.v1.discovery.k8s.io", "-A"])
                .map(drop)
        })?;
        // The lease endpoint reconciler of 1.20 also writes v1beta1 EndpointSlices, which are
        // off here: a cluster's `kubernetes` Endpoints are written once instead.
        if let (true, Some(addr)) = (self.cluster, self.listen) {
            let port = self.servers[0].port;
            self.retry("writing the kubernetes Endpoints", || {
                self.apply_yaml(&format!(
                    "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: kubernetes, namespace: default}}\nsubsets:\n  - addresses: [{{ip: \"{addr}\"}}]\n    ports: [{{name: https, port: {port}, protocol: TCP}}]\n"
                ))
            })?;
        }
        Ok(())
    }

    fn retry(&self, what: &str, mut f: impl FnMut() -> Result<()>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match f() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e.context(what.to_owned())),
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// A command run inside the namespace (or here without one).
    fn command(&self, program: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    fn start_etcd(&mut self) -> Result<()> {
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let mut c = self.command(Path::new("etcd"));
        c.args(["--name", "sluice", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args(["--listen-client-urls", &self.etcd_url()])
            .args(["--advertise-client-urls", &self.etcd_url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("sluice={peer}")])
            .args(["--log-level", "warn"]);
        let log = self.dir.join("etcd.log");
        self.etcd = Some(cmd::spawn_logged(c, &log)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.port_open(self.etcd_port)? {
            if let Some(Some(status)) = self.etcd.as_mut().map(|c| c.try_wait().ok().flatten()) {
                bail!("etcd exited ({status}): {}", tail(&log));
            }
            ensure!(
                Instant::now() < deadline,
                "etcd does not listen on 127.0.0.1:{} after 30 s: {}",
                self.etcd_port,
                tail(&log)
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The address kubeconfigs name.
    fn server_host(&self) -> Ipv4Addr {
        self.listen.unwrap_or(Ipv4Addr::LOCALHOST)
    }

    fn port_open(&self, port: u16) -> Result<bool> {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into();
        let probe =
            move || Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok());
        match &self.netns {
            Some(ns) => netns::run_in(ns, probe),
            None => probe(),
        }
    }

    /// Starts another API server on the same etcd and returns its index (0 is the first). Tests
    /// use a second one to change objects while the agent's server is down.
    pub fn add_apiserver(&mut self) -> Result<usize> {
        let i = self.servers.len();
        let port = free_ports(self.netns.as_deref(), 1)?[0];
        let cert_dir = self.dir.join(format!("apiserver-{i}"));
        fs::create_dir_all(&cert_dir)?;
        let kubeconfig = self.dir.join(format!("admin-{i}.kubeconfig"));
        fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                self.server_host(),
                port,
                &cert_dir.join("apiserver.crt"),
                &self.admin_token,
            ),
        )?;
        self.servers.push(ApiServer {
            port,
            log: self.dir.join(format!("apiserver-{i}.log")),
            cert_dir,
            kubeconfig,
            child: None,
        });
        self.start_apiserver(i)?;
        Ok(i)
    }

    /// Starts API server `i` again (after [`Kube::stop_apiserver`]), on the same port and
    /// certificate, and waits until it is ready.
    pub fn start_apiserver(&mut self, i: usize) -> Result<()> {
        ensure!(i < self.servers.len(), "no API server {i}");
        ensure!(self.servers[i].child.is_none(), "API server {i} is running");
        let s = &self.servers[i];
        let mut c = self.command(&self.bin.join("kube-apiserver"));
        c.arg(format!("--etcd-servers={}", self.etcd_url()))
            .args(match self.listen {
                Some(addr) => [
                    "--bind-address=0.0.0.0".into(),
                    format!("--advertise-address={addr}"),
                ],
                None => [
                    "--bind-address=127.0.0.1".to_owned(),
                    "--advertise-address=127.0.0.1".to_owned(),
                ],
            })
            .arg(format!("--secure-port={}", s.port))
            .args(["--insecure-port=0", "--endpoint-reconciler-type=none"]);
        if self.cluster {
            c.arg("--allow-privileged=true")
                // Without it, `kubectl logs/exec` look the node's name up in DNS.
                .arg("--kubelet-preferred-address-types=InternalIP");
        }
        c.arg(format!("--cert-dir={}", s.cert_dir.display()))
            .arg(format!(
                "--token-auth-file={}",
                self.dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-key-file={}",
                self.dir.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                self.dir.join("sa.key").display()
            ))
            .arg(if self.dual_stack {
                "--service-cluster-ip-range=10.96.0.0/16,fd00:96::/112"
            } else {
                "--service-cluster-ip-range=10.96.0.0/16"
            })
            .args(
                self.dual_stack
                    .then_some("--feature-gates=IPv6DualStack=true"),
            )
            .args(
                self.node_port_range
                    .map(|r| format!("--service-node-port-range={r}")),
            )
            .arg("--runtime-config=discovery.k8s.io/v1beta1=false")
            .arg("--logtostderr=true")
            .arg("-v=0");
        // Appends: a restarted server's log follows the first one's.
        let log = s.log.clone();
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        c.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = c
            .spawn()
            .with_context(|| format!("starting kube-apiserver {i}"))?;
        self.servers[i].child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.servers[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.servers[i].child = None;
                bail!("kube-apiserver {i} exited ({status}): {}", tail(&log));
            }
            if self
                .kubectl_on(i, &["get", "--raw", "/readyz"], Duration::from_secs(10))
                .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "kube-apiserver {i} not ready after {START_TIMEOUT:?}: {}",
                tail(&log)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills API server `i` (SIGTERM, then SIGKILL): its clients lose their connections.
    pub fn stop_apiserver(&mut self, i: usize) -> Result<()> {
        ensure!(i < self.servers.len(), "no API server {i}");
        if let Some(mut c) = self.servers[i].child.take() {
            cmd::terminate(&mut c, Duration::from_secs(10));
        }
        Ok(())
    }

    /// Stops and starts API server `i`.
    pub fn restart_apiserver(&mut self, i: usize) -> Result<()> {
        self.stop_apiserver(i)?;
        self.start_apiserver(i)
    }

    /// Compacts etcd's history up to its current revision: a watch resuming from an older
    /// resourceVersion then gets `410 Gone` and must relist.
    pub fn compact(&self) -> Result<u64> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .context("etcdctl endpoint status -w json: not JSON")?;
        let rev = v
            .get(0)
            .and_then(|e| e.pointer("/Status/header/revision"))
            .and_then(serde_json::Value::as_u64)
            .context("etcdctl endpoint status: no revision")?;
        self.etcdctl(&["compact", &rev.to_string(), "--physical"])?;
        Ok(rev)
    }

    fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        let mut c = self.command(Path::new("etcdctl"));
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.etcd_url()))
            .args(args);
        cmd::run_ok(&mut c, cmd::DEFAULT_TIMEOUT)
    }

    /// The temp dir (certificates, logs, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The service-account signing key (kube-controller-manager's token controller needs it).
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    /// The self-signed certificate of API server `i` (its CA for clients).
    pub fn ca_cert(&self, i: usize) -> PathBuf {
        self.servers[i].cert_dir.join("apiserver.crt")
    }

    /// One request to API server 0 as admin (curl inside the namespace): `method` on `path`
    /// (`/api/v1/pods`) with an optional body of `content_type`. Returns the answer parsed as
    /// JSON, or an error with the answer's body unless the status is 2xx.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &serde_json::Value)>,
    ) -> Result<serde_json::Value> {
        let s = &self.servers[0];
        let mut c = self.command(Path::new("curl"));
        c.args([
            "--silent",
            "--show-error",
            "--fail-with-body",
            "--max-time",
            "30",
        ])
        .arg("--cacert")
        .arg(s.cert_dir.join("apiserver.crt"))
        .args(["-H", &format!("Authorization: Bearer {}", self.admin_token)])
        .args(["-X", method]);
        if let Some((content_type, v)) = body {
            c.args(["-H", &format!("Content-Type: {content_type}")])
                .args(["--data-binary", &v.to_string()]);
        }
        c.arg(format!("https://{}:{}{path}", self.server_host(), s.port));
        let out = cmd::run_ok(&mut c, cmd::DEFAULT_TIMEOUT)
            .with_context(|| format!("{method} {path}"))?;
        if out.stdout.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("{method} {path}: not JSON"))
    }

    /// The binaries' directory (kubectl, kubelet, kube-proxy, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The port of API server `i` (on 127.0.0.1 of the namespace).
    pub fn apiserver_port(&self, i: usize) -> u16 {
        self.servers[i].port
    }
    /// An admin kubeconfig for API server `i`.
    pub fn admin_kubeconfig(&self, i: usize) -> &Path {
        &self.servers[i].kubeconfig
    }
    /// The log of API server `i`.
    pub fn apiserver_log(&self, i: usize) -> String {
        fs::read_to_string(&self.servers[i].log).unwrap_or_default()
    }

    /// kubectl (the 1.20 build matching the server) as admin on API server `i`, any exit status.
    pub fn kubectl_on(&self, i: usize, args: &[&str], timeout: Duration) -> Result<Output> {
        cmd::run(&mut self.kubectl_command(i, args), timeout)
    }

    /// The command of [`Kube::kubectl_on`], to spawn (a long-running `kubectl exec`).
    pub fn kubectl_command(&self, i: usize, args: &[&str]) -> Command {
        let mut c = self.command(&self.bin.join("kubectl"));
        c.arg("--kubeconfig")
            .arg(&self.servers[i].kubeconfig)
            .args(args);
        c
    }

    /// kubectl as admin on API server 0; fails with its stderr unless it exits 0.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_ok_on(0, args)
    }

    /// The holder of Lease `name` in `namespace` ("" when it is released or not created yet).
    pub fn lease_holder(&self, namespace: &str, name: &str) -> Result<String> {
        let out = self.kubectl_ok(&[
            "get",
            "lease",
            "--ignore-not-found",
            "-n",
            namespace,
            name,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The holders of the Leases in `namespace` labelled `selector`: name -> holder ("" when
    /// released).
    pub fn lease_holders(
        &self,
        namespace: &str,
        selector: &str,
    ) -> Result<BTreeMap<String, String>> {
        let out = self.kubectl_ok(&[
            "get", "leases", "-n", namespace, "-l", selector, "-o", "json",
        ])?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("kubectl get leases: not JSON")?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| {
                let name = l["metadata"]["name"].as_str()?.to_owned();
                let holder = l["spec"]["holderIdentity"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                Some((name, holder))
            })
            .collect())
    }

    /// Like [`Kube::kubectl_ok`] on API server `i`.
    pub fn kubectl_ok_on(&self, i: usize, args: &[&str]) -> Result<Output> {
        let out = self.kubectl_on(i, args, cmd::DEFAULT_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "`kubectl {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(out)
    }

    /// `kubectl apply -f` of `yaml` on API server 0.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        self.apply_yaml_on(0, yaml)
    }

    /// `kubectl apply -f` of `yaml` on API server `i`.
    pub fn apply_yaml_on(&self, i: usize, yaml: &str) -> Result<()> {
        let path = self.dir.join(format!(
            "apply-{}.yaml",
            self.seq.fetch_add(1, Ordering::SeqCst)
        ));
        fs::write(&path, yaml)?;
        self.kubectl_ok_on(i, &["apply", "-f", &path.to_string_lossy()])?;
        Ok(())
    }

    /// An IPAddressPool (sluice.io) holding `addresses` (CIDRs, ranges, addresses), once the
    /// resource is established (deploy/ applied by [`Kube::agent_kubeconfig`]). With
    /// `auto_assign` false the allocator hands out nothing on its own: a test that writes its
    /// Services' status itself (as MetalLB would) keeps its addresses, and they may be announced.
    pub fn pool(
        &self,
        name: &str,
        addresses: &[String],
        auto_assign: bool,
        allow_external_ips: bool,
    ) -> Result<()> {
        self.kubectl_ok(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/ipaddresspools.sluice.io",
        ])?;
        let pool = serde_json::json!({
            "apiVersion": "sluice.io/v1alpha1",
            "kind": "IPAddressPool",
            "metadata": {"name": name},
            "spec": {
                "addresses": addresses,
                "autoAssign": auto_assign,
                "allowExternalIps": allow_external_ips,
            },
        });
        self.apply_yaml(&pool.to_string())
    }

    /// JSON merge patch of `path`'s status subresource (e.g. `/api/v1/nodes/n0`) as admin on API
    /// server 0: how controllers (MetalLB, the kubelet) write status, which kubectl 1.20 cannot.
    pub fn patch_status(&self, path: &str, patch: &serde_json::Value) -> Result<()> {
        self.api(
            "PATCH",
            &format!("{path}/status"),
            Some(("application/merge-patch+json", patch)),
        )
        .with_context(|| format!("patching the status of {path}"))?;
        Ok(())
    }

    /// Creates (or updates) Node `name` with `internal_ip` and a Ready condition, as a kubelet
    /// would: the object, then its status.
    pub fn node(&self, name: &str, internal_ip: Ipv4Addr, ready: bool) -> Result<()> {
        self.node_with(name, &[internal_ip.into()], ready)
    }

    /// As [`Kube::node`] with several InternalIPs (a dual-stack node lists one per family).
    pub fn node_with(
        &self,
        name: &str,
        internal_ips: &[std::net::IpAddr],
        ready: bool,
    ) -> Result<()> {
        let exists = !self
            .kubectl_ok(&["get", "node", name, "--ignore-not-found", "-o", "name"])?
            .stdout
            .is_empty();
        if !exists {
            self.apply_yaml(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n"
            ))?;
        }
        let status = if ready { "True" } else { "False" };
        self.patch_status(
            &format!("/api/v1/nodes/{name}"),
            &serde_json::json!({"status": {
                "addresses": internal_ips
                    .iter()
                    .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip.to_string()}))
                    .chain([serde_json::json!({"type": "Hostname", "address": name})])
                    .collect::<Vec<_>>(),
                "conditions": [{"type": "Ready", "status": status,
                                "reason": "SluiceTest", "message": "set by sluice-tests",
                                "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            }}),
        )
    }

    /// Applies the shipped manifests (deploy/base: namespace, ServiceAccount, RBAC, ...) as admin and
    /// writes a kubeconfig for API server 0 holding a token of the agent's own ServiceAccount
    /// (from the TokenRequest API): the agent then has exactly the rights deploy/ grants.
    pub fn agent_kubeconfig(&self) -> Result<PathBuf> {
        let deploy = repo_root().join("deploy/base");
        self.kubectl_ok(&["apply", "-k", &deploy.to_string_lossy()])?;
        let request = self.dir.join("token-request.json");
        fs::write(
            &request,
            r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":86400}}"#,
        )?;
        let out = self.kubectl_ok(&[
            "create",
            "--raw",
            &format!(
                "/api/v1/namespaces/{AGENT_NAMESPACE}/serviceaccounts/{AGENT_SERVICE_ACCOUNT}/token"
            ),
            "-f",
            &request.to_string_lossy(),
        ])?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("TokenRequest answer: not JSON")?;
        let token = v
            .pointer("/status/token")
            .and_then(serde_json::Value::as_str)
            .context("TokenRequest answer without status.token")?;
        let path = self.dir.join("agent.kubeconfig");
        let s = &self.servers[0];
        fs::write(
            &path,
            kubeconfig_yaml(
                self.server_host(),
                s.port,
                &s.cert_dir.join("apiserver.crt"),
                token,
            ),
        )?;
        Ok(path)
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                cmd::terminate(&mut c, Duration::from_secs(10));
            }
        }
        if let Some(mut c) = self.etcd.take() {
            cmd::terminate(&mut c, Duration::from_secs(10));
        }
        if std::env::var_os("SLUICE_KEEP_KUBE").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Stops what a test process killed before its Drop left: for every temp dir
/// `sluice-kube-<pid>-<n>` whose pid is gone, the processes whose command line names that dir
/// (its etcd and API servers), then the dir.
fn cleanup_stale() {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("sluice-kube-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || cmd::pid_alive(pid) {
            continue;
        }
        let dir = e.path().to_string_lossy().into_owned();
        for proc_entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(p) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if p != me && String::from_utf8_lossy(&cmdline).contains(&dir) {
                cmd::signal(p, libc::SIGKILL);
            }
        }
        let _ = fs::remove_dir_all(e.path());
    }
}

/// A kube-rs client from `kubeconfig` (e.g. [`Kube::admin_kubeconfig`]), for the many requests
/// of a benchmark or a scale run that kubectl would send one process at a time. Call it on a
/// thread inside the API server's namespace.
pub async fn client(kubeconfig: &Path) -> Result<::kube::Client> {
    let kc = ::kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config =
        ::kube::Config::from_custom_kubeconfig(kc, &::kube::config::KubeConfigOptions::default())
            .await?;
    Ok(::kube::Client::try_from(config)?)
}

fn kubeconfig_yaml(host: Ipv4Addr, port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: sluice-test
    cluster:
      server: https://{host}:{port}
      certificate-authority: {ca}
users:
  - name: user
    user:
      token: {token}
contexts:
  - name: sluice-test
    context: {{cluster: sluice-test, user: user}}
current-context: sluice-test
",
        ca = ca.display()
    )
}

/// `n` distinct free TCP ports on 127.0.0.1 (of namespace `netns`, or here).
fn free_ports(netns: Option<&str>, n: usize) -> Result<Vec<u16>> {
    let pick = move || {
        // All bound at once, so the kernel hands out distinct ones.
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<std::io::Result<_>>()?;
        Ok(listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<_>>()?)
    };
    match netns {
        Some(ns) => netns::run_in(ns, pick),
        None => pick(),
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u64::from_ne_bytes(b) ^ u64::from(std::process::id())
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
