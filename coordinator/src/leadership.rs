//! Leading a group of coordinators that share an etcd store: two or three `cohort
//! coordinator` processes with the same `--store etcd://...`, of which one leads and the
//! others stand by.
//!
//! - **Election.** Each coordinator takes an etcd lease of `--leader-lease-s` (3 s by
//!   default), renews it every third of that, and campaigns under `{prefix}/leader` with its
//!   address; etcd makes the candidate whose key is oldest the leader. Until it leads, a
//!   coordinator serves only [`standby`] answers naming the leader, and writes nothing.
//! - **Fencing.** Every write of a leader's store is an etcd transaction that also checks that
//!   the leader's election key still has the create revision it had when it won ([`Fence`]).
//!   Once the lease ends (not renewed in time: the process was paused, or etcd was out of
//!   reach), etcd deletes the key and every later write of that coordinator fails, whatever
//!   its memory says: a leader that comes back from a pause can never overwrite its
//!   successor's state.
//! - **Losing.** A coordinator that learns it lost the leadership (a renewal refused or late,
//!   or a fenced write refused) stops serving and exits with an error; a supervisor
//!   (systemd's `Restart=always`) starts it again, as a standby. Kubernetes' controllers do
//!   the same.
//! - **Taking over.** The new leader loads the store as a restarted coordinator does: queued
//!   jobs stay queued, and running jobs keep running if their workers register again with it
//!   within the restart grace (the heartbeat deadline). Workers and ranks follow the leader
//!   through [`cohort_proto::failover`]. The rendezvous store is in memory and starts empty:
//!   ranks use it to form their links when they start, so running ranks do not need it; a rank
//!   that starts during a failover retries its calls until the new leader answers.
//!
//! With the embedded store there is no group and no election: the coordinator leads alone.

pub mod standby;

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::store::etcd::{CONNECT_TIMEOUT, describe_etcd_error, endpoint_url};
pub use crate::store::fence::Fence;
use crate::store::fence::{Loss, lose};

/// The leader's lease when the operator gives none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3);

/// The shortest lease accepted: etcd grants nothing shorter than about 1.5 s anyway.
pub const MIN_LEASE: Duration = Duration::from_secs(2);

/// The longest lease accepted.
pub const MAX_LEASE: Duration = Duration::from_secs(60);

/// How often a standby asks etcd who leads, to name the leader in its answers.
const LEADER_POLL: Duration = Duration::from_millis(500);

/// Pause before campaigning again after etcd failed a campaign.
const CAMPAIGN_RETRY: Duration = Duration::from_secs(1);

/// Longest a resigning leader waits for etcd to revoke its lease.
const RESIGN_TIMEOUT: Duration = Duration::from_secs(2);

/// A coordinator's won election: its fence, and the task that renews its lease.
pub struct Leadership {
    /// The fence its store's writes carry.
    fence: Fence,
    /// Resolves to the reason once the leadership is lost.
    lost: watch::Receiver<Option<String>>,
    /// The etcd client of the election.
    client: Client,
    /// The lease the election key lives on.
    lease: i64,
    /// Renews the lease.
    renewal: JoinHandle<()>,
}

impl Leadership {
    /// Campaigns until this coordinator leads the group under `prefix` of the etcd at
    /// `endpoint`, with `address` as what standbys tell clients, on a lease of `lease`.
    /// Meanwhile `leader` is kept up to date with the current leader's address (`None`: no
    /// leader), for the standby answers.
    pub async fn campaign(
        endpoint: &str,
        prefix: &str,
        address: &str,
        lease: Duration,
        leader: &watch::Sender<Option<String>>,
    ) -> Result<Self> {
        let mut client = connect(endpoint).await?;
        let failed = |doing: &str, error: etcd_client::Error| {
            Error::Store(format!(
                "{doing} (etcd at {endpoint}): {}",
                describe_etcd_error(&error)
            ))
        };
        let ttl = i64::try_from(lease.as_secs()).unwrap_or(i64::MAX);
        let grant = tokio::time::timeout(CONNECT_TIMEOUT, client.lease_grant(ttl, None))
            .await
            .map_err(|_| Error::Store(format!("granting the leader lease (etcd at {endpoint}): no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|error| failed("granting the leader lease", error))?;
        let lease_id = grant.id();
        let (loss, lost) = watch::channel(None);
        let loss: Loss = Arc::new(loss);
        let renewal = tokio::spawn(renew(client.clone(), lease_id, lease, loss.clone()));
        let name = format!("{prefix}/leader");
        let watcher = tokio::spawn(watch_leader(client.clone(), name.clone(), leader.clone()));
        info!(%address, lease_s = lease.as_secs(), "campaigning for the leadership");
        let won = loop {
            if let Some(why) = lost.borrow().clone() {
                watcher.abort();
                renewal.abort();
                return Err(Error::LostLeadership(format!("while standing by: {why}")));
            }
            let mut election = client.election_client();
            let campaign = election.campaign(name.clone(), address, lease_id);
            let mut lost_while_waiting = lost.clone();
            tokio::select! {
                outcome = campaign => match outcome {
                    Ok(response) => match response.leader() {
                        Some(key) => break (key.key().to_vec(), key.rev()),
                        None => warn!("etcd answered a campaign without a leader key; campaigning again"),
                    },
                    Err(error) => warn!(error = %describe_etcd_error(&error), "campaign failed; campaigning again"),
                },
                _ = lost_while_waiting.wait_for(Option::is_some) => continue,
            }
            tokio::time::sleep(CAMPAIGN_RETRY).await;
        };
        watcher.abort();
        leader.send_replace(Some(address.to_owned()));
        let (key, revision) = won;
        info!(
            %address,
            key = %String::from_utf8_lossy(&key),
            revision,
            "elected leader"
        );
        Ok(Self {
            fence: Fence::new(key, revision, loss),
            lost,
            client,
            lease: lease_id,
            renewal,
        })
    }

    /// The fence every write of this leader's store carries.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Resolves, with the reason, once the leadership is lost.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            match lost.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or_default(),
                Err(_) => "the lease renewal stopped".to_owned(),
            }
        }
    }

    /// Whether the leadership is lost, and why.
    pub fn lost_reason(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Hands the leadership over at once: revokes the lease (deleting the election key), so
    /// that a standby takes over without waiting for the lease to run out.
    pub async fn resign(mut self) {
        self.renewal.abort();
        match tokio::time::timeout(RESIGN_TIMEOUT, self.client.lease_revoke(self.lease)).await {
            Ok(Ok(_)) => info!("resigned the leadership"),
            Ok(Err(error)) => {
                warn!(error = %describe_etcd_error(&error), "could not resign; the lease runs out instead")
            }
            Err(_) => warn!("etcd did not answer the resignation; the lease runs out instead"),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Connects the election's client: no request timeout (a campaign waits as long as another
/// coordinator leads), HTTP/2 keep-alive to notice a dead etcd.
async fn connect(endpoint: &str) -> Result<Client> {
    let url = endpoint_url(endpoint)?;
    let options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    tokio::time::timeout(CONNECT_TIMEOUT, Client::connect([&url], Some(options)))
        .await
        .map_err(|_| {
            Error::Store(format!(
                "etcd at {endpoint} is unreachable: no answer within {CONNECT_TIMEOUT:?}"
            ))
        })?
        .map_err(|error| {
            Error::Store(format!(
                "etcd at {endpoint} is unreachable: {}",
                describe_etcd_error(&error)
            ))
        })
}

/// Renews `lease_id` every third of `lease` until the lease is lost: etcd says it expired,
/// or no renewal was confirmed for a whole `lease` (counted from when each renewal was sent,
/// which is when etcd starts counting too).
async fn renew(mut client: Client, lease_id: i64, lease: Duration, loss: Loss) {
    let interval = lease / 3;
    let mut confirmed = Instant::now();
    let mut stream = None;
    loop {
        let sent = Instant::now();
        if sent.duration_since(confirmed) >= lease {
            lose(
                &loss,
                format!("the leader lease was not renewed for {lease:?}"),
            );
            return;
        }
        if stream.is_none() {
            stream = tokio::time::timeout(interval, client.lease_keep_alive(lease_id))
                .await
                .ok()
                .and_then(std::result::Result::ok);
        }
        if let Some((keeper, responses)) = stream.as_mut() {
            let answer = tokio::time::timeout(interval, async {
                keeper.keep_alive().await?;
                responses.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(response))) if response.ttl() > 0 => confirmed = sent,
                Ok(Ok(Some(_))) => {
                    lose(&loss, "etcd says the leader lease expired".to_owned());
                    return;
                }
                // A broken stream is opened again on the next round.
                _ => stream = None,
            }
        }
        tokio::time::sleep_until(sent + interval).await;
    }
}

/// Keeps `leader` up to date with the address of whoever leads election `name`, asking etcd
/// every [`LEADER_POLL`]; runs until aborted.
async fn watch_leader(client: Client, name: String, leader: watch::Sender<Option<String>>) {
    let mut election = client.election_client();
    loop {
        let current = match election.leader(name.clone()).await {
            Ok(response) => response
                .kv()
                .map(|pair| String::from_utf8_lossy(pair.value()).into_owned()),
            // etcd answers "election: no leader" when nobody leads.
            Err(_) => None,
        };
        leader.send_if_modified(|known| {
            let changed = *known != current;
            if changed {
                known.clone_from(&current);
            }
            changed
        });
        tokio::time::sleep(LEADER_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ClusterStore;
    use crate::store::conformance::sample_job;
    use crate::store::etcd::EtcdStore;
    use cohort_cluster_tests::etcd::TestEtcd;

    const PREFIX: &str = "/group";

    /// The store of `leadership`, fenced by it.
    async fn fenced_store(endpoint: &str, leadership: &Leadership) -> EtcdStore {
        EtcdStore::connect(endpoint, PREFIX)
            .await
            .unwrap()
            .fenced(leadership.fence())
    }

    /// `address` campaigns with `lease` until it leads; its leadership and its fenced store.
    async fn lead(endpoint: &str, address: &str, lease: Duration) -> (Leadership, EtcdStore) {
        let (seen, _) = watch::channel(None);
        let leadership = Leadership::campaign(endpoint, PREFIX, address, lease, &seen)
            .await
            .unwrap();
        let store = fenced_store(endpoint, &leadership).await;
        (leadership, store)
    }

    async fn etcd(test_name: &'static str) -> Option<TestEtcd> {
        tokio::task::spawn_blocking(move || TestEtcd::start_or_skip(test_name))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_deposed_leader_writes_nothing_and_its_successor_takes_over() {
        let Some(etcd) = etcd("a_deposed_leader_writes_nothing").await else {
            return;
        };
        let endpoint = etcd.endpoint();
        let lease = MIN_LEASE;
        let (first, first_store) = lead(&endpoint, "first:1", lease).await;
        first_store.put_job(&sample_job(1)).await.unwrap();

        // A second coordinator stands by, and sees who leads.
        let (second_seen, mut seen) = watch::channel(None);
        let second_endpoint = endpoint.clone();
        let second = tokio::spawn(async move {
            Leadership::campaign(&second_endpoint, PREFIX, "second:2", lease, &second_seen).await
        });
        tokio::time::timeout(Duration::from_secs(10), seen.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen.borrow().as_deref(), Some("first:1"));
        assert!(!second.is_finished(), "two leaders at once");

        // The first's lease ends behind its back, as it does while its process is paused.
        let mut client = connect(&endpoint).await.unwrap();
        client.lease_revoke(first.lease).await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the standby takes over")
            .unwrap()
            .unwrap();
        assert_eq!(seen.borrow().as_deref(), Some("second:2"));
        let second_store = fenced_store(&endpoint, &second).await;

        // Every kind of write of the first is refused, and says why.
        let refused = first_store.put_job(&sample_job(2)).await.unwrap_err();
        assert!(matches!(refused, Error::LostLeadership(_)), "{refused}");
        assert!(refused.to_string().contains("writing job"), "{refused}");
        assert!(matches!(
            first_store.next_job_seq().await,
            Err(Error::LostLeadership(_))
        ));
        assert!(matches!(
            first_store.remove_user("nobody").await,
            Err(Error::LostLeadership(_))
        ));
        let why = tokio::time::timeout(Duration::from_secs(1), first.lost())
            .await
            .expect("the refused write reports the loss");
        assert!(why.contains("leader key is gone"), "{why}");

        // The successor writes; the store holds its records and none of the first's late ones.
        second_store.put_job(&sample_job(3)).await.unwrap();
        assert_eq!(second_store.next_job_seq().await.unwrap(), 1);
        let mut ids: Vec<String> = second_store
            .list_jobs()
            .await
            .unwrap()
            .records
            .into_iter()
            .map(|job| job.id.to_string())
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            [sample_job(1).id.to_string(), sample_job(3).id.to_string()]
        );
        second.resign().await;
    }

    #[tokio::test]
    async fn a_resigning_leader_hands_over_at_once_and_settings_are_shared() {
        let Some(etcd) = etcd("a_resigning_leader_hands_over_at_once").await else {
            return;
        };
        let endpoint = etcd.endpoint();
        // A long lease: only a resignation can hand over within the test's bound.
        let lease = Duration::from_secs(30);
        let (first, first_store) = lead(&endpoint, "first:1", lease).await;
        let second_endpoint = endpoint.clone();
        let second = tokio::spawn(async move { lead(&second_endpoint, "second:2", lease).await });
        // The first proposal of a setting is what everyone gets.
        assert_eq!(
            first_store.shared_setting("job_key", b"one").await.unwrap(),
            Some(b"one".to_vec())
        );
        let resigned_at = Instant::now();
        first.resign().await;
        let (_second, second_store) = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the standby takes over once the leader resigns")
            .unwrap();
        assert!(resigned_at.elapsed() < Duration::from_secs(5));
        assert_eq!(
            second_store
                .shared_setting("job_key", b"two")
                .await
                .unwrap(),
            Some(b"one".to_vec())
        );
    }
}
