//! ReconciliationService (like the national 3201 / 3202): a later issue; answers UNIMPLEMENTED.

use super::error::unimplemented;
use super::pb::{self, reconciliation_service_server::ReconciliationService};
use super::Services;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

#[tonic::async_trait]
impl ReconciliationService for Services {
    async fn daily_totals(
        &self,
        _: Request<pb::DailyTotalsRequest>,
    ) -> Result<Response<pb::DailyTotalsResponse>, Status> {
        Err(unimplemented("DailyTotals"))
    }

    type DailyDetailsStream = Pin<Box<dyn Stream<Item = Result<pb::DailyDetail, Status>> + Send + 'static>>;

    async fn daily_details(
        &self,
        _: Request<pb::DailyDetailsRequest>,
    ) -> Result<Response<Self::DailyDetailsStream>, Status> {
        Err(unimplemented("DailyDetails"))
    }
}
