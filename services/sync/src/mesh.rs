//! The mesh: this box's sync service replicating with paired boxes
//! (`box:BOXID/db` endpoints in `_replicator`).
//!
//! A box is reached only if the device registry lists it as a paired box.
//! Its address comes from mDNS (the `_cloudlet._tcp` record announcing its
//! box ID, TXT `sync` for the port), or from `CLOUDLET_BOX_ADDRS` when
//! given. The TLS client presents this service's own chain (its key, then
//! the box identity that certified it: the other box lets it in as the
//! paired box) and accepts only a server chain that ends at the other box's
//! pinned identity key.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cloudlet_runtime::dial::{self, BoxService, Resolver};
use cloudlet_runtime::registry::RegistryAuth;

use crate::peer::{BoxDialer, BoxRoute};

/// How long mDNS is asked for a box's address.
const LOOKUP: Duration = Duration::from_secs(3);

pub struct Mesh {
    registry: Arc<RegistryAuth>,
    resolver: Resolver,
}

impl Mesh {
    pub fn new(registry: Arc<RegistryAuth>, resolver: Resolver) -> Mesh {
        Mesh { registry, resolver }
    }

    async fn route_to(&self, box_id: &str) -> Result<BoxRoute, String> {
        let want = box_id.replace('-', "");
        let paired = self
            .registry
            .paired_boxes()
            .await
            .map_err(|e| format!("asking the device registry for paired boxes: {e}"))?;
        let b = paired
            .into_iter()
            .find(|b| b.box_id.replace('-', "") == want)
            .ok_or_else(|| {
                format!(
                    "box {box_id} is not paired with this box (pair them with `cloudlet pair-box`)"
                )
            })?;
        let own = self
            .registry
            .service_cert()
            .await
            .map_err(|e| format!("this service's certificate: {e}"))?;
        let client = dial::box_client_config(&own, &b.key_hash)?;
        let addrs = self
            .resolver
            .resolve(&b.box_id, BoxService::Sync, LOOKUP)
            .await?;
        Ok(BoxRoute {
            config: client.config,
            server_name: client.server_name,
            addrs,
        })
    }
}

impl BoxDialer for Mesh {
    fn route<'a>(
        &'a self,
        box_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<BoxRoute, String>> + Send + 'a>> {
        Box::pin(self.route_to(box_id))
    }
}
