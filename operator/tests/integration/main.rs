//! The operator's integration tests, one binary. `pass`, `push` and
//! `leader` run everywhere (the Kubernetes API answered in-process, real
//! sidecar processes); `reconcile`, `failover` and `chart` need the real
//! kube-apiserver testbed and helm, and say SKIPPED without them (or fail,
//! under `INFERGATE_KUBE_TESTS=1` as in `scripts/test`).

mod fixtures;
mod testbed;

mod chart;
mod failover;
mod leader;
mod pass;
mod push;
mod reconcile;
