//! The two deployment paths agree: `contracts/script/Deploy.s.sol` (what operators run with
//! their own key) puts SessionPaymaster exactly where the Rust deploy path predicts.

use std::process::Command;

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use session_paymaster::chain::deploy::{Artifacts, create2, entry_point_salt};
use session_paymaster::userop::{EntryPointVersion, ISessionPaymaster};

use crate::helpers::{TestAnvil, TestResult, contracts_dir};

#[tokio::test]
async fn forge_deploy_script_lands_at_the_predicted_address() -> TestResult {
    for version in EntryPointVersion::ALL {
        let anvil = TestAnvil::start().await?;
        let from = anvil.account().await?;
        let artifacts = Artifacts::new(contracts_dir());
        let ep = create2(
            &anvil.provider,
            from,
            entry_point_salt(version),
            &artifacts.entry_point(version)?,
            "EntryPoint",
        )
        .await?;
        assert_eq!(
            ep,
            version.canonical_address(),
            "canonical EntryPoint v{version}"
        );

        let (owner, signer) = (Address::repeat_byte(0x0d), Address::repeat_byte(0x5e));
        let predicted = artifacts.session_paymaster_address(version, ep, owner, &[signer])?;
        let profile = match version {
            EntryPointVersion::V0_7 => "default",
            EntryPointVersion::V0_8 => "v08",
        };
        let out = Command::new(contracts_dir().join("node_modules/.bin/forge"))
            .current_dir(contracts_dir())
            .args([
                "script",
                "script/Deploy.s.sol",
                "--rpc-url",
                &anvil.url,
                "--broadcast",
                "--unlocked",
            ])
            .args(["--sender", &from.to_string()])
            .env("FOUNDRY_PROFILE", profile)
            .env("ENTRY_POINT", ep.to_string())
            .env("PAYMASTER_OWNER", owner.to_string())
            .env("PAYMASTER_SIGNER", signer.to_string())
            .env("PAYMASTER_DEPOSIT_WEI", "12345")
            .output()?;
        assert!(
            out.status.success(),
            "forge script: {}",
            String::from_utf8_lossy(&out.stdout)
        );

        assert!(
            !anvil.provider.get_code_at(predicted).await?.is_empty(),
            "code at {predicted}"
        );
        let pm = ISessionPaymaster::new(predicted, &anvil.provider);
        assert_eq!(pm.owner().call().await?, owner);
        assert!(pm.isSigner(signer).call().await?);
        assert_eq!(pm.getDeposit().call().await?, U256::from(12345));
    }
    Ok(())
}
