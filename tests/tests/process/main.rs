//! The process tests: real sidecars, watchdogs, providers, etcd and ZooKeeper on loopback, one
//! module per capability, in one test binary (linked once; its tests share one pool of test
//! threads, and the load timelines one lock, [`detour_tests::serial`]).

mod admin_control;
mod bounded_state;
mod catalog_cache;
mod cli;
mod data_path;
mod durable_state;
mod etcd_mesh;
mod etcd_registry;
mod etcd_secure;
mod failover;
mod gray;
mod gray_versions;
mod mtls;
mod observability;
mod policy;
mod policy_registry;
mod registry_sync;
mod registry_sync_load;
mod resilience;
mod routing;
mod security_faults;
mod traces;
mod trust;
mod unprivileged;
mod watchdog;
mod watchdog_adopt;
