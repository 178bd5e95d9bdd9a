//! Control requests (from [`crate::control`], which does the socket and the
//! permission check) answered against init's state.

use cloudlet_proto::control::{Request, Response};

use super::{Init, ShutdownMode};
use crate::supervisor::Event;

impl Init {
    pub(super) fn control(&mut self, req: Request) -> Response {
        match req {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Logs { service, lines } => match self.sup.index_of(&service) {
                Some(i) => {
                    let lines = self
                        .logs
                        .get(i)
                        .map(|l| l.lock().map(|b| b.tail(lines)).unwrap_or_default())
                        .unwrap_or_default();
                    Response::Logs { service, lines }
                }
                None => no_such_service(&service),
            },
            Request::Pairing { state } => {
                tracing::info!(?state, "pairing LED");
                self.panel_event(crate::panel::Event::Pairing(state));
                Response::Accepted
            }
            Request::Update { state } => {
                tracing::info!(?state, "update LED");
                self.panel_event(crate::panel::Event::Update(state));
                Response::Accepted
            }
            Request::Restart { service } => match self.sup.index_of(&service) {
                Some(svc) => {
                    if self.shutdown.is_some() {
                        return Response::Error {
                            message: "shutting down".into(),
                        };
                    }
                    self.note(svc, "restart requested over the control socket".into());
                    self.event(Event::RestartRequested { svc });
                    Response::Accepted
                }
                None => no_such_service(&service),
            },
            Request::Events { after, .. } => Response::Events {
                events: self.presses.after(after),
            },
            Request::Reboot => {
                self.begin_shutdown(ShutdownMode::Reboot, "control request");
                Response::Accepted
            }
            Request::PowerOff => {
                self.begin_shutdown(ShutdownMode::PowerOff, "control request");
                Response::Accepted
            }
        }
    }
}

fn no_such_service(name: &str) -> Response {
    Response::Error {
        message: format!("no service named {name:?}"),
    }
}
