//! What each module's RPC methods may use of the application: the application implements
//! every module's context trait, handing out only the state that module acts on.

use std::sync::Arc;

use serde_json::Value;

use super::{config, App};
use crate::bdev::aio::rpc::AioContext;
use crate::bdev::aio::AioFiles;
use crate::bdev::rbd::rpc::RbdContext;
use crate::bdev::rbd::RbdState;
use crate::bdev::rpc::BdevContext;
use crate::bdev::BdevRegistry;
use crate::keyring::rpc::KeyringContext;
use crate::keyring::Keyring;
use crate::nbd::rpc::NbdContext;
use crate::nbd::NbdState;
use crate::reactor::Reactors;
use crate::rpc::framework::FrameworkContext;
use crate::rpc::{RpcContext, RpcError, RpcMethods};
use crate::vhost::rpc::VhostContext;
use crate::vhost::VhostRegistry;

impl RpcContext for App {
    fn methods(&self) -> &RpcMethods<App> {
        &self.rpc
    }

    fn after_call(&self, method: &str, succeeded: bool) -> Result<(), RpcError> {
        self.persist_after_call(method, succeeded)
    }
}

impl FrameworkContext for App {
    fn reactors(&self) -> &Reactors {
        &self.reactors
    }

    fn subsystems(&self) -> Vec<(&'static str, &'static [&'static str])> {
        config::SUBSYSTEMS
            .iter()
            .map(|s| (s.name, s.depends_on))
            .collect()
    }

    fn subsystem_config(&self, name: &str) -> Option<Vec<Value>> {
        config::subsystem(name).map(|s| (s.config)(self))
    }
}

impl BdevContext for App {
    fn bdevs(&self) -> &BdevRegistry {
        &self.bdevs
    }
}

impl KeyringContext for App {
    fn keyring(&self) -> &Keyring {
        &self.keyring
    }
}

impl AioContext for App {
    fn aio_files(&self) -> &AioFiles {
        &self.aio_files
    }
}

impl RbdContext for App {
    fn rbd(&self) -> &RbdState {
        &self.rbd
    }
}

impl VhostContext for App {
    fn vhost(&self) -> &VhostRegistry {
        &self.vhost
    }
}

impl NbdContext for App {
    fn nbd(&self) -> &NbdState {
        &self.nbd
    }

    fn nbd_reactors(&self) -> &Arc<Reactors> {
        &self.reactors
    }

    fn socket_mode(&self) -> u32 {
        self.opts.socket_mode
    }
}
