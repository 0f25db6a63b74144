//! Requests exactly as a tonic-generated stub hands them to the channel
//! (`QueryServiceClient::get_product` through `tonic::client::Grpc::unary`):
//! a `POST` over HTTP/2 to the origin plus a `PathAndQuery::from_static`
//! path, the `te` and `content-type` headers `Grpc` adds, the
//! `tonic::GrpcMethod` extension the stub inserts, and the body tonic
//! encodes (an `EncodeBody` over a one-message stream, boxed in a
//! `tonic::body::Body`).

use catalog_proto::GetProductRequest;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Uri};
use tonic::codec::{Codec, EncodeBody};

/// Builds stub-shaped `GetProduct` requests.
#[derive(Clone, Debug)]
pub(crate) struct StubRequests {
    origin: Uri,
    message: GetProductRequest,
}

impl Default for StubRequests {
    fn default() -> Self {
        StubRequests {
            origin: Uri::from_static("http://127.0.0.1:50051"),
            // About 1 KiB encoded, as the other retry rows send.
            message: GetProductRequest {
                id: "p".repeat(1017),
            },
        }
    }
}

impl StubRequests {
    /// A fresh request, built the way tonic builds it for each call.
    pub(crate) fn request(&self) -> Request<tonic::body::Body> {
        let mut codec =
            tonic_prost::ProstCodec::<GetProductRequest, catalog_proto::Product>::default();
        let source = tokio_stream::once(Ok(self.message.clone()));
        let body =
            tonic::body::Body::new(EncodeBody::new_client(codec.encoder(), source, None, None));
        let mut parts = self.origin.clone().into_parts();
        parts.path_and_query = Some(PathAndQuery::from_static(
            "/catalog.v1.QueryService/GetProduct",
        ));
        let uri = Uri::from_parts(parts).expect("a valid URI");
        let mut request = Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        *request.version_mut() = http::Version::HTTP_2;
        request.extensions_mut().insert(tonic::GrpcMethod::new(
            "catalog.v1.QueryService",
            "GetProduct",
        ));
        let headers = request.headers_mut();
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        request
    }
}
