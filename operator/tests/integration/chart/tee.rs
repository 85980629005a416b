//! The chart's attestation values (issue 18).

use super::*;

/// Public attestation reports are on in the example; the TEE values (off
/// by default) mount configfs-tsm and pass the quote and GPU evidence
/// flags, every one of them a flag the sidecar has.
#[test]
fn tee_values_mount_configfs_tsm_and_pass_the_attestation_flags() {
    let Some(helm) = helm() else { return };
    let sidecar_of = |docs: &[Value]| {
        let vllm = of_kind(docs, "Deployment")
            .find(|d| name(d) == "vllm")
            .expect("example Deployment")
            .clone();
        pod_spec(&vllm)
    };
    let plain = sidecar_of(&render(&helm, &["example.enabled=true"]));
    let args = container(&plain, "infergate").args.clone().unwrap();
    assert!(args.contains(&"--public-attestation".to_owned()));
    assert!(args.contains(&"--public-attestation-per-minute=60".to_owned()));
    assert!(!args
        .iter()
        .any(|a| a.starts_with("--tee-") || a.starts_with("--gpu-")));

    let docs = render(
        &helm,
        &[
            "example.enabled=true",
            "example.tee.configfsTsm.enabled=true",
            "example.tee.gpuEvidence.command=nv-evidence $INFERGATE_NONCE_HEX",
            "example.sidecar.publicAttestation.enabled=false",
        ],
    );
    check_schema(&docs);
    let spec = sidecar_of(&docs);
    let sidecar = container(&spec, "infergate");
    let args = sidecar.args.clone().unwrap();
    assert_flags_exist(&crate::testbed::sidecar_bin(), &args, &[]);
    assert!(args.contains(&"--tee-configfs-tsm=/sys/kernel/config/tsm/report".to_owned()));
    assert!(args.contains(&"--gpu-evidence-command=nv-evidence $INFERGATE_NONCE_HEX".to_owned()));
    assert!(!args.iter().any(|a| a.starts_with("--public-attestation")));
    let tsm = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "tsm-report")
        .expect("the configfs-tsm volume");
    let host = tsm.host_path.as_ref().unwrap();
    assert_eq!(host.path, "/sys/kernel/config/tsm/report");
    let mount = sidecar
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "tsm-report")
        .unwrap();
    assert_eq!(mount.mount_path, "/sys/kernel/config/tsm/report");
    assert_ne!(mount.read_only, Some(true));
    // configfs entries belong to root; the rest stays locked down.
    let sc = sidecar.security_context.clone().unwrap();
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let drop = sc.capabilities.and_then(|c| c.drop).unwrap_or_default();
    assert!(drop.iter().any(|d| d == "ALL"));
}
