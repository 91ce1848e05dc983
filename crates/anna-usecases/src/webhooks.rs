//! The webhooks context: a tenant's endpoints (created, changed, deleted, their secrets
//! rotated, each with its event through the outbox), and their delivery logs and replays.
//! Another tenant's endpoint or delivery does not exist for the caller.

use std::sync::Arc;
use std::time::Duration;

use anna_domain::InvalidArgument;
use anna_domain::secrets::Sealer;
use anna_domain::webhook::{self, EndpointChanges, EventFilter, NewEndpoint, WebhookEndpoint};
use anna_store::Store;
use anna_store::webhooks::{AttemptRecord, DeliveryRecord, DeliveryStatus};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Failure, time_duration, traced};

/// Settings of the webhooks context (`WEBHOOKS_*`) that the API applies.
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// `WEBHOOKS_ALLOW_PRIVATE`: URLs may point to loopback, private and link-local addresses.
    pub allow_private: bool,
    /// `WEBHOOKS_MAX_PER_TENANT`: 0 = no limit.
    pub max_per_tenant: u32,
    /// `WEBHOOKS_SECRET_GRACE_MS`: how long a rotated-out secret keeps signing.
    pub secret_grace: Duration,
    /// `WEBHOOKS_DEADLINE_MS`: a delivery not done this long after it was created (or
    /// replayed) is dead-lettered.
    pub deadline: Duration,
    /// `WEBHOOKS_CIRCUIT_FAILURES`: consecutive failures that open an endpoint's circuit (shown
    /// in its state).
    pub circuit_threshold: u32,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            max_per_tenant: 20,
            secret_grace: Duration::from_secs(24 * 3600),
            deadline: Duration::from_secs(24 * 3600),
            circuit_threshold: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook {0} not found")]
    NotFound(Uuid),
    #[error("delivery {0} not found")]
    DeliveryNotFound(Uuid),
    #[error("{0}")]
    Invalid(String),
    #[error("the tenant has {0} webhooks, the most allowed (WEBHOOKS_MAX_PER_TENANT)")]
    TooMany(u32),
    #[error("delivery {0} is still {1}: only a succeeded or dead delivery can be replayed")]
    NotFinished(Uuid, &'static str),
    #[error("the webhook's secret cannot be sealed or opened: {0}")]
    Secret(String),
    #[error(transparent)]
    Failed(#[from] Failure),
}

crate::store_failures!(WebhookError);

impl From<InvalidArgument> for WebhookError {
    fn from(error: InvalidArgument) -> Self {
        Self::Invalid(error.0)
    }
}

impl From<anna_domain::secrets::SealError> for WebhookError {
    fn from(error: anna_domain::secrets::SealError) -> Self {
        Self::Secret(error.to_string())
    }
}

/// What a tenant gives to create an endpoint.
#[derive(Debug, Clone, Default)]
pub struct EndpointRequest {
    pub url: Option<String>,
    pub description: Option<String>,
    pub events: Option<Vec<String>>,
    pub enabled: Option<bool>,
    pub ordered: Option<bool>,
}

/// A page of the delivery log.
#[derive(Debug, Clone)]
pub struct DeliveryPage {
    pub deliveries: Vec<DeliveryRecord>,
    /// The id to pass as `cursor` for the next page, when there may be one.
    pub next_cursor: Option<Uuid>,
}

pub struct Webhooks {
    store: Arc<dyn Store>,
    sealer: Sealer,
    config: WebhooksConfig,
}

impl Webhooks {
    pub fn new(store: Arc<dyn Store>, server_secret: &[u8], config: WebhooksConfig) -> Self {
        Self { store, sealer: webhook::secret_sealer(server_secret), config }
    }

    pub fn config(&self) -> &WebhooksConfig {
        &self.config
    }

    fn url(&self, raw: &str) -> Result<String, WebhookError> {
        Ok(webhook::parse_url(raw, self.config.allow_private)?.to_string())
    }

    /// A new endpoint and its secret (`whsec_…`, shown this once).
    pub async fn create(
        &self,
        tenant_id: Uuid,
        request: EndpointRequest,
    ) -> Result<(WebhookEndpoint, String), WebhookError> {
        let url = self.url(request.url.as_deref().unwrap_or_default())?;
        let description = request.description.unwrap_or_default();
        webhook::check_description(&description)?;
        let filter = match request.events {
            Some(events) => EventFilter::parse(&events)?,
            None => EventFilter::all(),
        };
        let settings = NewEndpoint {
            url,
            description,
            filter,
            enabled: request.enabled.unwrap_or(true),
            ordered: request.ordered.unwrap_or(false),
        };
        let now = OffsetDateTime::now_utc();
        let (endpoint, secret, event) = WebhookEndpoint::create(tenant_id, settings, &self.sealer, now)?;
        let mut uow = self.store.begin().await?;
        let limit = self.config.max_per_tenant;
        if limit > 0 && uow.count_webhook_endpoints(tenant_id).await? >= u64::from(limit) {
            return Err(WebhookError::TooMany(limit));
        }
        uow.insert_webhook_endpoint(&endpoint).await?;
        uow.append_events(&traced([event])).await?;
        uow.commit().await?;
        Ok((endpoint, secret.reveal()))
    }

    pub async fn list(&self, tenant_id: Uuid) -> Result<Vec<WebhookEndpoint>, WebhookError> {
        Ok(self.store.list_webhook_endpoints(tenant_id).await?)
    }

    pub async fn get(&self, tenant_id: Uuid, id: Uuid) -> Result<WebhookEndpoint, WebhookError> {
        match self.store.find_webhook_endpoint(id).await? {
            Some(endpoint) if endpoint.tenant_id == tenant_id => Ok(endpoint),
            _ => Err(WebhookError::NotFound(id)),
        }
    }

    /// Runs `change` on the caller's endpoint in a unit of work, with the event it yields.
    async fn change<T>(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        change: impl FnOnce(&mut WebhookEndpoint) -> Result<(T, Option<anna_domain::DomainEvent>), WebhookError>,
    ) -> Result<(WebhookEndpoint, T), WebhookError> {
        let mut uow = self.store.begin().await?;
        let mut endpoint = match uow.find_webhook_endpoint(id).await? {
            Some(endpoint) if endpoint.tenant_id == tenant_id => endpoint,
            _ => return Err(WebhookError::NotFound(id)),
        };
        let (value, event) = change(&mut endpoint)?;
        if let Some(event) = event {
            uow.update_webhook_endpoint(&endpoint).await?;
            uow.append_events(&traced([event])).await?;
            uow.commit().await?;
        }
        Ok((endpoint, value))
    }

    pub async fn update(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        request: EndpointRequest,
    ) -> Result<WebhookEndpoint, WebhookError> {
        let changes = EndpointChanges {
            url: request.url.as_deref().map(|url| self.url(url)).transpose()?,
            description: request.description.map(|d| webhook::check_description(&d).map(|()| d)).transpose()?,
            filter: request.events.as_deref().map(EventFilter::parse).transpose()?,
            enabled: request.enabled,
            ordered: request.ordered,
        };
        let now = OffsetDateTime::now_utc();
        let (endpoint, ()) = self.change(tenant_id, id, |endpoint| Ok(((), endpoint.change(changes, now)))).await?;
        Ok(endpoint)
    }

    /// A new secret (shown this once); the previous one signs beside it for
    /// `WEBHOOKS_SECRET_GRACE_MS`.
    pub async fn rotate_secret(&self, tenant_id: Uuid, id: Uuid) -> Result<(WebhookEndpoint, String), WebhookError> {
        let now = OffsetDateTime::now_utc();
        let (sealer, grace) = (&self.sealer, self.config.secret_grace);
        self.change(tenant_id, id, |endpoint| {
            let (secret, event) = endpoint.rotate_secret(sealer, grace, now)?;
            Ok((secret.reveal(), Some(event)))
        })
        .await
    }

    /// Deletes the endpoint, its deliveries and their log.
    pub async fn delete(&self, tenant_id: Uuid, id: Uuid) -> Result<(), WebhookError> {
        let mut uow = self.store.begin().await?;
        let endpoint = match uow.find_webhook_endpoint(id).await? {
            Some(endpoint) if endpoint.tenant_id == tenant_id => endpoint,
            _ => return Err(WebhookError::NotFound(id)),
        };
        uow.delete_webhook_endpoint(id).await?;
        uow.append_events(&traced([endpoint.delete(OffsetDateTime::now_utc())])).await?;
        uow.commit().await?;
        Ok(())
    }

    /// A page of the endpoint's deliveries, newest first.
    pub async fn deliveries(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        status: Option<DeliveryStatus>,
        cursor: Option<Uuid>,
        limit: u32,
    ) -> Result<DeliveryPage, WebhookError> {
        self.get(tenant_id, id).await?;
        let limit = limit.clamp(1, 100);
        let deliveries = self.store.list_webhook_deliveries(id, status, cursor, limit).await?;
        let next_cursor =
            if deliveries.len() == limit as usize { deliveries.last().map(|delivery| delivery.id) } else { None };
        Ok(DeliveryPage { deliveries, next_cursor })
    }

    async fn own_delivery(&self, tenant_id: Uuid, id: Uuid, delivery_id: Uuid) -> Result<DeliveryRecord, WebhookError> {
        self.get(tenant_id, id).await?;
        match self.store.find_webhook_delivery(delivery_id).await? {
            Some(delivery) if delivery.endpoint_id == id => Ok(delivery),
            _ => Err(WebhookError::DeliveryNotFound(delivery_id)),
        }
    }

    /// One delivery with every attempt.
    pub async fn delivery(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        delivery_id: Uuid,
    ) -> Result<(DeliveryRecord, Vec<AttemptRecord>), WebhookError> {
        let delivery = self.own_delivery(tenant_id, id, delivery_id).await?;
        let attempts = self.store.list_webhook_attempts(delivery_id).await?;
        Ok((delivery, attempts))
    }

    fn replay_deadline(&self, now: OffsetDateTime) -> OffsetDateTime {
        now.checked_add(time_duration(self.config.deadline)).unwrap_or(now)
    }

    /// Sends a succeeded or dead delivery again (same `webhook-id`), due now.
    pub async fn replay(&self, tenant_id: Uuid, id: Uuid, delivery_id: Uuid) -> Result<DeliveryRecord, WebhookError> {
        let delivery = self.own_delivery(tenant_id, id, delivery_id).await?;
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        if !uow.replay_webhook_delivery(delivery_id, now, self.replay_deadline(now)).await? {
            return Err(WebhookError::NotFinished(delivery_id, delivery.status.as_str()));
        }
        uow.commit().await?;
        self.own_delivery(tenant_id, id, delivery_id).await
    }

    /// Replays every delivery of the endpoint in `status` (dead by default) created since
    /// `since`. Returns how many.
    pub async fn replay_all(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        status: Option<DeliveryStatus>,
        since: Option<OffsetDateTime>,
    ) -> Result<u64, WebhookError> {
        let status = status.unwrap_or(DeliveryStatus::Dead);
        if !matches!(status, DeliveryStatus::Dead | DeliveryStatus::Succeeded) {
            return Err(WebhookError::Invalid("status must be dead or succeeded".into()));
        }
        self.get(tenant_id, id).await?;
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        let replayed = uow.replay_webhook_deliveries(id, status, since, now, self.replay_deadline(now)).await?;
        uow.commit().await?;
        Ok(replayed)
    }
}
