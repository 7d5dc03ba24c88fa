//! When a node went down is data in the catalog: the leader's clock enters only through
//! the `NodeDown` command, and the first time is kept until the node returns.

use control_plane::catalog::Catalog;
use protocol::cluster::{CatalogReply, CatalogRequest, Command, Health, NodeReport};

fn apply(catalog: &mut Catalog, request_id: u128, command: Command) -> CatalogReply {
    catalog
        .apply(&CatalogRequest {
            request_id,
            command,
        })
        .unwrap()
}

fn register(name: &str) -> Command {
    Command::RegisterNode(NodeReport {
        name: name.into(),
        site: "site-a".into(),
        address: format!("{name}:7100"),
        nbd_address: format!("{name}:10809"),
        capacity_bytes: 1 << 30,
        control_plane: false,
    })
}

fn down(name: &str, since_unix_seconds: u64) -> Command {
    Command::NodeDown {
        node: name.into(),
        since_unix_seconds,
    }
}

#[test]
fn a_node_down_keeps_the_time_it_went_down_until_it_returns() {
    let mut catalog = Catalog::default();
    apply(&mut catalog, 1, register("n1"));
    assert_eq!(catalog.node("n1").unwrap().down_since_unix_seconds, None);
    apply(&mut catalog, 2, down("n1", 1_000));
    let record = catalog.node("n1").unwrap();
    assert_eq!(record.health, Health::Down);
    assert_eq!(record.down_since_unix_seconds, Some(1_000));
    // A second mark (a new leader counting afresh) keeps the first time.
    apply(&mut catalog, 3, down("n1", 2_000));
    assert_eq!(
        catalog.node("n1").unwrap().down_since_unix_seconds,
        Some(1_000)
    );
    apply(&mut catalog, 4, register("n1"));
    let record = catalog.node("n1").unwrap();
    assert_eq!(record.health, Health::Up);
    assert_eq!(record.down_since_unix_seconds, None);
    apply(&mut catalog, 5, down("n1", 3_000));
    assert_eq!(
        catalog.node("n1").unwrap().down_since_unix_seconds,
        Some(3_000)
    );
    // Marking it up by health clears the time as well.
    apply(
        &mut catalog,
        6,
        Command::SetNodeHealth {
            node: "n1".into(),
            health: Health::Up,
        },
    );
    assert_eq!(catalog.node("n1").unwrap().down_since_unix_seconds, None);
}

#[test]
fn an_unknown_node_cannot_be_marked_down() {
    let mut catalog = Catalog::default();
    let refused = catalog.apply(&CatalogRequest {
        request_id: 1,
        command: down("ghost", 1_000),
    });
    assert!(refused.is_err());
    assert_eq!(catalog.nodes().count(), 0);
}
