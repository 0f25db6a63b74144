use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use grpc_idempotency::{Idempotency, IdempotencyLayer, MemoryStore, Store};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tower_layer::Layer;

use crate::v1::command_service_server::{CommandService, CommandServiceServer};
use crate::v1::query_service_server::{QueryService, QueryServiceServer};
use crate::v1::{
    CreateProductRequest, CreateProductResponse, GetProductRequest, ImportProductsResponse,
    ListProductsRequest, Product,
};

/// The metadata key a client sets to make a write idempotent: a second
/// `CreateProduct` with a key already seen returns the first result without
/// writing again (the Command service is served behind
/// `grpc_idempotency::IdempotencyLayer`).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The Command service as [`InMemoryCatalog::command_service`] serves it:
/// the generated server behind the idempotency layer.
pub type IdempotentCommandService<St = MemoryStore> =
    Idempotency<CommandServiceServer<InMemoryCatalog>, St>;

#[derive(Debug, Default)]
struct State {
    products: Mutex<Vec<Product>>,
    writes: AtomicU64,
    streams_cancelled: AtomicU64,
    imported_bytes: AtomicU64,
}

/// What the catalog's handlers did, for assertions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CatalogStats {
    /// `CreateProduct` calls that wrote a product.
    pub writes: u64,
    /// `CreateProduct` calls answered from an earlier call with the same
    /// idempotency key, without writing (replays by the idempotency layer
    /// of [`InMemoryCatalog::command_service`]).
    pub deduplicated: u64,
    /// `ListProducts` streams the client went away from before their end.
    pub streams_cancelled: u64,
    /// `blob` bytes received by `ImportProducts`.
    pub imported_bytes: u64,
}

/// An in-memory product catalog serving both the Query and the Command
/// service. Clones share the same products.
#[derive(Clone, Debug)]
pub struct InMemoryCatalog {
    state: Arc<State>,
    idempotency: IdempotencyLayer,
}

impl Default for InMemoryCatalog {
    fn default() -> Self {
        InMemoryCatalog {
            state: Arc::default(),
            idempotency: IdempotencyLayer::new(["catalog.v1.CommandService/CreateProduct"])
                .expect("a valid selector"),
        }
    }
}

impl InMemoryCatalog {
    /// A catalog holding `count` products, `p1` to `p{count}`.
    pub fn with_products(count: usize) -> Self {
        let catalog = Self::default();
        {
            let mut products = catalog.products();
            for i in 1..=count {
                products.push(Product {
                    id: format!("p{i}"),
                    name: format!("Product {i}"),
                    price_cents: 100 * i as i64,
                    blob: Vec::new(),
                });
            }
        }
        catalog
    }

    /// Adds a product (for a test or a benchmark).
    pub fn insert(&self, product: Product) {
        self.products().push(product);
    }

    fn products(&self) -> std::sync::MutexGuard<'_, Vec<Product>> {
        self.state
            .products
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What the handlers did so far.
    pub fn stats(&self) -> CatalogStats {
        CatalogStats {
            writes: self.state.writes.load(Ordering::SeqCst),
            deduplicated: self.idempotency.stats().hits,
            streams_cancelled: self.state.streams_cancelled.load(Ordering::SeqCst),
            imported_bytes: self.state.imported_bytes.load(Ordering::SeqCst),
        }
    }

    /// How many products the catalog holds.
    pub fn len(&self) -> usize {
        self.products().len()
    }

    /// Whether the catalog is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The Query service, for `Server::add_service`.
    pub fn query_service(&self) -> QueryServiceServer<Self> {
        QueryServiceServer::new(self.clone())
    }

    /// The Command service, for `Server::add_service`: `CreateProduct`
    /// runs once per idempotency key (an in-memory store, this catalog's
    /// own), through `grpc_idempotency::IdempotencyLayer`.
    pub fn command_service(&self) -> IdempotentCommandService {
        self.idempotency
            .layer(CommandServiceServer::new(self.clone()))
    }

    /// The Command service behind an idempotency layer of your own (a
    /// Redis store shared by replicas, other options). Its replays are in
    /// `layer.stats()`, not in [`CatalogStats::deduplicated`].
    pub fn command_service_with<St: Store>(
        &self,
        layer: &IdempotencyLayer<St>,
    ) -> IdempotentCommandService<St> {
        layer.layer(CommandServiceServer::new(self.clone()))
    }

    /// The bare Command service, deduplicating nothing.
    pub fn command_service_without_idempotency(&self) -> CommandServiceServer<Self> {
        CommandServiceServer::new(self.clone())
    }
}

#[tonic::async_trait]
impl QueryService for InMemoryCatalog {
    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<Product>, Status> {
        let id = request.into_inner().id;
        let found = self.products().iter().find(|p| p.id == id).cloned();
        found
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no product `{id}`")))
    }

    type ListProductsStream = ReceiverStream<Result<Product, Status>>;

    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<Self::ListProductsStream>, Status> {
        let ListProductsRequest { limit, interval_ms } = request.into_inner();
        let products = self.products().clone();
        let count = if limit == 0 {
            products.len()
        } else {
            limit as usize
        };
        let (tx, rx) = mpsc::channel(1);
        let state = self.state.clone();
        tokio::spawn(async move {
            // Cycle through the catalog when asked for more than it holds.
            for product in products.iter().cycle().take(count) {
                if interval_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(interval_ms))).await;
                }
                if tx.send(Ok(product.clone())).await.is_err() {
                    state.streams_cancelled.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl CommandService for InMemoryCatalog {
    async fn create_product(
        &self,
        request: Request<CreateProductRequest>,
    ) -> Result<Response<CreateProductResponse>, Status> {
        let product = request
            .into_inner()
            .product
            .ok_or_else(|| Status::invalid_argument("`product` is required"))?;
        if product.id.is_empty() {
            return Err(Status::invalid_argument("`product.id` must not be empty"));
        }
        {
            let mut products = self.products();
            if products.iter().any(|p| p.id == product.id) {
                return Err(Status::already_exists(format!(
                    "product `{}` exists",
                    product.id
                )));
            }
            products.push(product.clone());
        }
        self.state.writes.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(CreateProductResponse {
            product: Some(product),
        }))
    }

    async fn import_products(
        &self,
        request: Request<Streaming<Product>>,
    ) -> Result<Response<ImportProductsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut imported = 0u32;
        let mut blob_bytes = 0u64;
        while let Some(product) = stream.message().await? {
            imported += 1;
            blob_bytes += product.blob.len() as u64;
            self.products().push(product);
        }
        self.state
            .imported_bytes
            .fetch_add(blob_bytes, Ordering::SeqCst);
        Ok(Response::new(ImportProductsResponse {
            imported,
            blob_bytes,
        }))
    }
}
