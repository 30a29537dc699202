//! How many connections a daemon holds, and for whom, so that no client —
//! a thousand half-sent requests, a few hundred from one address — keeps
//! the others out (nginx's `limit_conn`, envoy's overload manager).
//!
//! The whole budget follows the files this process may open (each connection
//! is one), up to [`MOST`]; one address other than this machine's own may
//! hold a quarter of it; and once three quarters are held, a new connection
//! must send its request's headers within [`HURRIED`] instead of
//! [`super::HEADER_TIMEOUT`]: the rest is kept for clients that send their
//! request at once (a token holder, `/health`), and slow ones are shed first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The most connections a daemon serves at once, however many files it may open.
pub const MOST: usize = 4096;
/// Files kept for what is not a connection: stores, model files, pipes, children.
const FILES_KEPT: usize = 128;
/// The header deadline of a connection that arrives when the budget is
/// three quarters held.
pub const HURRIED: Duration = Duration::from_secs(2);

/// The connections held, by remote address.
#[derive(Debug, Clone)]
pub struct Budget {
    total: usize,
    per_address: usize,
    held: Arc<Mutex<Held>>,
}

#[derive(Debug, Default)]
struct Held {
    all: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One connection's place in the budget, given back when dropped.
#[derive(Debug)]
pub struct Place {
    held: Arc<Mutex<Held>>,
    address: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.all = held.all.saturating_sub(1);
        if let Some(n) = held.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                held.by_address.remove(&self.address);
            }
        }
    }
}

impl Budget {
    /// A budget of `total` connections.
    pub fn new(total: usize) -> Budget {
        let total = total.max(8);
        Budget {
            total,
            per_address: (total / 4).max(2),
            held: Arc::default(),
        }
    }

    /// The budget this process's open-file limit allows.
    pub fn for_this_process() -> Budget {
        let files = crate::process::open_file_limit().unwrap_or(1024);
        Budget::new(files.saturating_sub(FILES_KEPT).min(MOST))
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// A place for a connection from `address`, with its header deadline;
    /// `None` when the budget, or that address's share of it, is held.
    /// This machine's own addresses have no share of their own.
    pub fn admit(&self, address: IpAddr, header_timeout: Duration) -> Option<(Place, Duration)> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.all >= self.total {
            return None;
        }
        let address = canonical(address);
        let from_here = address.is_loopback();
        let mine = held.by_address.get(&address).copied().unwrap_or(0);
        if !from_here && mine >= self.per_address {
            return None;
        }
        let deadline = if held.all >= self.total * 3 / 4 {
            HURRIED.min(header_timeout)
        } else {
            header_timeout
        };
        held.all += 1;
        *held.by_address.entry(address).or_default() += 1;
        let place = Place {
            held: self.held.clone(),
            address,
        };
        Some((place, deadline))
    }
}

/// An IPv4 peer on a dual-stack socket is one address, however it is written.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOW: Duration = Duration::from_secs(15);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_holds_a_quarter_and_the_others_still_get_in() {
        let budget = Budget::new(400);
        let flood: Vec<_> = (0..500)
            .filter_map(|_| budget.admit(ip("10.0.0.9"), SLOW))
            .collect();
        assert_eq!(flood.len(), 100, "a quarter of the budget");
        assert!(
            budget.admit(ip("::ffff:10.0.0.9"), SLOW).is_none(),
            "the same address"
        );
        let (_place, deadline) = budget.admit(ip("10.0.0.2"), SLOW).expect("another gets in");
        assert_eq!(deadline, SLOW);
        drop(flood);
        assert!(budget.admit(ip("10.0.0.9"), SLOW).is_some(), "given back");
    }

    #[test]
    fn past_three_quarters_new_connections_must_hurry_and_past_all_none_get_in() {
        let budget = Budget::new(100);
        // Several addresses (each within its share), and this machine's own.
        let mut held: Vec<_> = (0..3)
            .flat_map(|i| {
                let budget = budget.clone();
                (0..25).filter_map(move |_| {
                    budget
                        .admit(ip(&format!("10.0.0.{i}")), SLOW)
                        .map(|(place, _)| place)
                })
            })
            .collect();
        assert_eq!(held.len(), 75);
        let (place, deadline) = budget.admit(ip("127.0.0.1"), SLOW).unwrap();
        assert_eq!(deadline, HURRIED);
        held.push(place);
        while let Some((place, _)) = budget.admit(ip("127.0.0.1"), SLOW) {
            held.push(place);
        }
        assert_eq!(
            held.len(),
            100,
            "loopback has no share of its own, only the whole"
        );
        assert!(budget.admit(ip("10.0.0.7"), SLOW).is_none());
    }
}
