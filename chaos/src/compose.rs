//! The cluster of `docker-compose.yml`: two sites, five containers from the `FROM
//! scratch` image `tandem:local` (built by `docker/build-image.sh`). Faults are the
//! container engine's: `docker kill -s KILL`, `docker pause`, and `docker network
//! disconnect`/`connect` for partitions (a disconnected container reaches nobody, the run
//! included). The run reaches the containers at their addresses on the compose network.

use crate::cluster::{Cluster, NodeSpec};
use crate::schedule::FaultKind;
use crate::Error;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The faults this backend can inject: no delay or loss (the compose nodes do not enable
/// the node's own fault injection, and the kernel here has no netem).
pub fn fault_kinds() -> Vec<FaultKind> {
    FaultKind::ALL
        .into_iter()
        .filter(|kind| !matches!(kind, FaultKind::DelayCalls | FaultKind::LoseCalls))
        .collect()
}

/// The compose project the run uses, apart from anyone's own `docker-compose up`.
pub const PROJECT: &str = "tandem-chaos";
/// The QUIC and NBD ports of every container.
pub const QUIC_PORT: u16 = 7100;
pub const NBD_PORT: u16 = 10809;
/// How long the started containers may take until every node is up.
pub const READY_SECONDS: u64 = 120;

fn docker(arguments: &[&str]) -> Result<String, Error> {
    run("docker", arguments)
}

fn compose(file: &Path, arguments: &[&str]) -> Result<String, Error> {
    let file = file.to_string_lossy();
    let mut all = vec!["-f", &file, "-p", PROJECT];
    all.extend_from_slice(arguments);
    run("docker-compose", &all)
}

fn run(program: &str, arguments: &[&str]) -> Result<String, Error> {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .map_err(|error| Error::Command {
            command: format!("{program} {}", arguments.join(" ")),
            detail: error.to_string(),
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(Error::Command {
            command: format!("{program} {}", arguments.join(" ")),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

struct Container {
    spec: NodeSpec,
    id: String,
    address: IpAddr,
    killed: bool,
    paused: bool,
    disconnected: bool,
}

pub struct ComposeCluster {
    file: PathBuf,
    nodes: Vec<NodeSpec>,
    containers: Vec<Container>,
    network: String,
    certs: tempfile::TempDir,
}

impl ComposeCluster {
    /// Brings the compose file in the current directory up from nothing (its volumes
    /// removed first), forms the three-member control plane and waits for every node.
    pub fn start(tandem: &Path) -> Result<ComposeCluster, Error> {
        let file = PathBuf::from("docker-compose.yml");
        if !file.exists() {
            return Err(Error::NotReady {
                detail: "run from the repository's top directory: no docker-compose.yml here"
                    .into(),
            });
        }
        if docker(&["image", "inspect", "tandem:local"]).is_err() {
            return Err(Error::NotReady {
                detail: "no image tandem:local: build it with `bash docker/build-image.sh`".into(),
            });
        }
        let _ = compose(&file, &["down", "-v", "--remove-orphans"]);
        compose(&file, &["run", "--rm", "init"])?;
        compose(&file, &["up", "-d"])?;
        let members = [
            ("member-a", "site-a"),
            ("member-b", "site-a"),
            ("member-c", "site-b"),
        ];
        let plain = [("node-a3", "site-a"), ("node-b2", "site-b")];
        let mut containers = Vec::new();
        for (name, site, member) in members
            .iter()
            .map(|(name, site)| (name, site, true))
            .chain(plain.iter().map(|(name, site)| (name, site, false)))
        {
            let id = compose(&file, &["ps", "-q", name])?;
            containers.push(Container {
                spec: NodeSpec {
                    name: name.to_string(),
                    site: site.to_string(),
                    member,
                },
                address: container_address(&id)?,
                id,
                killed: false,
                paused: false,
                disconnected: false,
            });
        }
        let network = docker(&[
            "inspect",
            "-f",
            "{{range $name, $network := .NetworkSettings.Networks}}{{$name}}{{end}}",
            &containers[0].id,
        ])?;
        let certs = tempfile::Builder::new()
            .prefix("tandem-chaos-certs-")
            .tempdir()?;
        docker(&[
            "cp",
            &format!("{}:/certs/.", containers[0].id),
            &certs.path().to_string_lossy(),
        ])?;
        let cluster = ComposeCluster {
            file,
            nodes: containers
                .iter()
                .map(|container| container.spec.clone())
                .collect(),
            containers,
            network,
            certs,
        };
        let first = cluster.endpoint("member-a")?;
        let cli = |arguments: &[&str]| {
            crate::processes::cli(tandem, cluster.certs.path(), first, arguments)
        };
        let initialized =
            crate::processes::wait_until(READY_SECONDS, || cli(&["cluster", "init"]).is_ok());
        if !initialized {
            cli(&["cluster", "init"])?;
        }
        for name in ["member-b", "member-c"] {
            let added = crate::processes::wait_until(READY_SECONDS, || {
                cli(&["cluster", "add-member", name]).is_ok()
            });
            if !added {
                cli(&["cluster", "add-member", name])?;
            }
        }
        Ok(cluster)
    }

    fn container(&self, node: &str) -> Result<&Container, Error> {
        self.containers
            .iter()
            .find(|container| container.spec.name == node)
            .ok_or_else(|| Error::UnknownNode { node: node.into() })
    }

    fn container_mut(&mut self, node: &str) -> Result<&mut Container, Error> {
        self.containers
            .iter_mut()
            .find(|container| container.spec.name == node)
            .ok_or_else(|| Error::UnknownNode { node: node.into() })
    }

    /// Reads the container's address again: a restarted or reconnected container may get
    /// another one. Only a running container on the network has one: a container both
    /// killed and cut off in one round gets its address at the second of its two heals,
    /// whichever order they come in (found by long runs: reading it at the first failed
    /// the heal with "no address on the compose network").
    fn refresh(&mut self, node: &str) -> Result<(), Error> {
        let container = self.container_mut(node)?;
        if container.killed || container.disconnected {
            return Ok(());
        }
        container.address = container_address(&container.id)?;
        Ok(())
    }
}

fn container_address(id: &str) -> Result<IpAddr, Error> {
    let address = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        id,
    ])?;
    address.parse().map_err(|_| Error::NotReady {
        detail: format!("container {id} has no address on the compose network ({address:?})"),
    })
}

impl Cluster for ComposeCluster {
    fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    fn certs(&self) -> &Path {
        self.certs.path()
    }

    fn endpoint(&self, node: &str) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::new(self.container(node)?.address, QUIC_PORT))
    }

    fn nbd(&self, node: &str) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::new(self.container(node)?.address, NBD_PORT))
    }

    fn kill(&mut self, node: &str) -> Result<(), Error> {
        let container = self.container_mut(node)?;
        if container.killed {
            return Ok(());
        }
        if container.paused {
            docker(&["unpause", &container.id])?;
            container.paused = false;
        }
        docker(&["kill", "-s", "KILL", &container.id])?;
        container.killed = true;
        Ok(())
    }

    fn restart(&mut self, node: &str) -> Result<(), Error> {
        let container = self.container_mut(node)?;
        if !container.killed {
            return Ok(());
        }
        docker(&["start", &container.id])?;
        container.killed = false;
        self.refresh(node)
    }

    fn pause(&mut self, node: &str) -> Result<(), Error> {
        let container = self.container_mut(node)?;
        if container.killed || container.paused {
            return Ok(());
        }
        docker(&["pause", &container.id])?;
        container.paused = true;
        Ok(())
    }

    fn resume(&mut self, node: &str) -> Result<(), Error> {
        let container = self.container_mut(node)?;
        if container.paused {
            docker(&["unpause", &container.id])?;
            container.paused = false;
        }
        Ok(())
    }

    /// A container is cut from everyone: the compose file has one network, and a
    /// partition from some peers only would need the node's own fault injection.
    fn partition(&mut self, node: &str, _peers: &[String]) -> Result<(), Error> {
        let network = self.network.clone();
        let container = self.container_mut(node)?;
        if container.disconnected {
            return Ok(());
        }
        docker(&["network", "disconnect", "--force", &network, &container.id])?;
        container.disconnected = true;
        Ok(())
    }

    fn reconnect(&mut self, node: &str, _peers: &[String]) -> Result<(), Error> {
        let network = self.network.clone();
        let container = self.container_mut(node)?;
        if !container.disconnected {
            return Ok(());
        }
        let alias = container.spec.name.clone();
        docker(&[
            "network",
            "connect",
            "--alias",
            &alias,
            &network,
            &container.id,
        ])?;
        container.disconnected = false;
        self.refresh(node)
    }

    fn degrade(
        &mut self,
        _node: &str,
        _peers: &[String],
        _delay: u64,
        _loss: u8,
    ) -> Result<(), Error> {
        Err(Error::Unsupported {
            backend: "compose",
            what: "delay or loss".into(),
        })
    }

    /// Heals every node, also after one of them failed to heal (that failure is the
    /// answer): one node's trouble must not leave the others cut off or paused.
    fn heal(&mut self) -> Result<(), Error> {
        let names: Vec<String> = self.nodes.iter().map(|node| node.name.clone()).collect();
        let mut first_failure = None;
        for name in &names {
            let healed = self
                .resume(name)
                .and_then(|()| self.restart(name))
                .and_then(|()| self.reconnect(name, &[]));
            if let Err(error) = healed {
                first_failure.get_or_insert(error);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    fn answering(&self, node: &str) -> bool {
        self.container(node).is_ok_and(|container| {
            !container.killed && !container.paused && !container.disconnected
        })
    }

    fn keep_files(&mut self) -> Option<PathBuf> {
        let directory = tempfile::Builder::new()
            .prefix("tandem-chaos-logs-")
            .tempdir()
            .ok()?
            .keep();
        let mut seen = HashSet::new();
        for container in &self.containers {
            if !seen.insert(container.id.clone()) {
                continue;
            }
            if let Ok(output) = Command::new("docker")
                .args(["logs", &container.id])
                .output()
            {
                let _ = std::fs::write(
                    directory.join(format!("{}.log", container.spec.name)),
                    [output.stdout, output.stderr].concat(),
                );
            }
        }
        Some(directory)
    }
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        let _ = compose(&self.file, &["down", "-v", "--remove-orphans"]);
    }
}
