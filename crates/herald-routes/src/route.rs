//! Routes and the route table.
//!
//! A [`RouteTable`] is the endpoints by name and the routes by name. It is only ever replaced by a table that
//! passed [`RouteTable::validate`]: every route names known endpoints that can play their part, and no chain of
//! routes can carry a message back to where it started (through herald's rooms or through a broker), which
//! would loop it forever.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::endpoint::{Endpoint, Role};
use crate::validate_name;

/// Routes one table may hold.
pub const MAX_ROUTES: usize = 1024;
/// Destinations one route may have.
pub const MAX_DESTINATIONS: usize = 64;

/// A route: every message from `from` is sent to each of `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The source endpoint's name.
    pub from: String,
    /// The destination endpoints' names.
    pub to: Vec<String>,
}

/// Why a route table (or a change to it) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A name with characters outside `[A-Za-z0-9_.-]`, empty, or too long.
    #[error("{what} name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    BadName {
        /// `route` or `endpoint`.
        what: String,
        /// The name (cut to 80 characters).
        name: String,
    },
    /// An endpoint's own fields are wrong.
    #[error("endpoint {name:?}: {reason}")]
    BadEndpoint {
        /// The endpoint.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A route names an endpoint that does not exist.
    #[error("route {route:?}: unknown endpoint {endpoint:?}")]
    UnknownEndpoint {
        /// The route.
        route: String,
        /// The missing endpoint.
        endpoint: String,
    },
    /// A route is malformed, or an endpoint cannot play its part in it.
    #[error("route {route:?}: {reason}")]
    BadRoute {
        /// The route.
        route: String,
        /// What is wrong.
        reason: String,
    },
    /// Routes that would carry messages around in a loop.
    #[error("routes form a cycle: {0}")]
    Cycle(String),
    /// An endpoint still used by routes cannot be removed.
    #[error("endpoint {endpoint:?} is used by route {route:?}")]
    InUse {
        /// The endpoint.
        endpoint: String,
        /// A route using it.
        route: String,
    },
    /// Too many routes.
    #[error("at most {MAX_ROUTES} routes")]
    TooManyRoutes,
}

/// Endpoints and routes by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Endpoints by name.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Routes by name.
    #[serde(default)]
    pub routes: BTreeMap<String, Route>,
}

impl RouteTable {
    /// Checks the whole table.
    pub fn validate(&self) -> Result<(), RouteError> {
        if self.routes.len() > MAX_ROUTES {
            return Err(RouteError::TooManyRoutes);
        }
        for (name, endpoint) in &self.endpoints {
            validate_name("endpoint", name)?;
            endpoint
                .validate()
                .map_err(|reason| RouteError::BadEndpoint {
                    name: name.clone(),
                    reason,
                })?;
        }
        for (name, route) in &self.routes {
            self.validate_route(name, route)?;
        }
        self.check_cycles()
    }

    fn validate_route(&self, name: &str, route: &Route) -> Result<(), RouteError> {
        validate_name("route", name)?;
        let bad = |reason: String| RouteError::BadRoute {
            route: name.to_owned(),
            reason,
        };
        let lookup = |endpoint: &str| {
            self.endpoints
                .get(endpoint)
                .ok_or_else(|| RouteError::UnknownEndpoint {
                    route: name.to_owned(),
                    endpoint: endpoint.to_owned(),
                })
        };
        if route.to.is_empty() {
            return Err(bad("no destinations".into()));
        }
        if route.to.len() > MAX_DESTINATIONS {
            return Err(bad(format!("more than {MAX_DESTINATIONS} destinations")));
        }
        let source = lookup(&route.from)?;
        source
            .validate_role(Role::Source, false)
            .map_err(|e| bad(format!("source {:?}: {e}", route.from)))?;
        let mut seen = BTreeSet::new();
        for to in &route.to {
            if to == &route.from {
                return Err(bad(format!("{to:?} is both source and destination")));
            }
            if !seen.insert(to) {
                return Err(bad(format!("destination {to:?} is listed twice")));
            }
            lookup(to)?
                .validate_role(Role::Destination, source.marshal().carries_rooms())
                .map_err(|e| bad(format!("destination {to:?}: {e}")))?;
        }
        Ok(())
    }

    /// Looks for a chain of routes whose destination feeds the source of the first: a message would loop.
    fn check_cycles(&self) -> Result<(), RouteError> {
        // Vertices are routes; an arc a -> b means one of a's destinations feeds b's source.
        let routes: Vec<(&String, &Route)> = self.routes.iter().collect();
        let arcs: Vec<Vec<usize>> = routes
            .iter()
            .map(|(_, a)| {
                routes
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, b))| {
                        let Some(source) = self.endpoints.get(&b.from) else {
                            return false;
                        };
                        a.to.iter().any(|to| {
                            to == &b.from
                                || self
                                    .endpoints
                                    .get(to)
                                    .is_some_and(|dest| dest.feeds(source))
                        })
                    })
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        // Iterative depth-first search with colours: 0 unseen, 1 on the stack, 2 done.
        let mut colour = vec![0u8; routes.len()];
        for start in 0..routes.len() {
            if colour[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, 0usize)];
            colour[start] = 1;
            while let Some((node, next)) = stack.last_mut() {
                if let Some(&succ) = arcs[*node].get(*next) {
                    *next += 1;
                    match colour[succ] {
                        0 => {
                            colour[succ] = 1;
                            stack.push((succ, 0));
                        }
                        1 => {
                            let from = stack.iter().position(|(n, _)| *n == succ).unwrap_or(0);
                            let mut path: Vec<&str> = stack[from..]
                                .iter()
                                .map(|(n, _)| routes[*n].0.as_str())
                                .collect();
                            path.push(routes[succ].0);
                            return Err(RouteError::Cycle(path.join(" -> ")));
                        }
                        _ => {}
                    }
                } else {
                    colour[*node] = 2;
                    stack.pop();
                }
            }
        }
        Ok(())
    }

    /// The table with `route` added or replaced, if the result is valid.
    pub fn with_route(&self, name: &str, route: Route) -> Result<RouteTable, RouteError> {
        let mut next = self.clone();
        next.routes.insert(name.to_owned(), route);
        next.validate()?;
        Ok(next)
    }

    /// The table with `endpoint` added or replaced, if the result is valid.
    pub fn with_endpoint(&self, name: &str, endpoint: Endpoint) -> Result<RouteTable, RouteError> {
        let mut next = self.clone();
        next.endpoints.insert(name.to_owned(), endpoint);
        next.validate()?;
        Ok(next)
    }

    /// The table without the endpoint `name`; refused while a route uses it.
    pub fn without_endpoint(&self, name: &str) -> Result<RouteTable, RouteError> {
        if let Some((route, _)) = self
            .routes
            .iter()
            .find(|(_, r)| r.from == name || r.to.iter().any(|t| t == name))
        {
            return Err(RouteError::InUse {
                endpoint: name.to_owned(),
                route: route.clone(),
            });
        }
        let mut next = self.clone();
        next.endpoints.remove(name);
        Ok(next)
    }

    /// Routes whose source is consumed from outside herald (Redis, AMQP): each needs exactly one consumer.
    pub fn external_sources(&self) -> impl Iterator<Item = (&String, &Route, &Endpoint)> {
        self.routes.iter().filter_map(|(name, route)| {
            let source = self.endpoints.get(&route.from)?;
            source.is_external_source().then_some((name, route, source))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(value: serde_json::Value) -> RouteTable {
        serde_json::from_value(value).unwrap()
    }

    fn base() -> serde_json::Value {
        json!({
            "endpoints": {
                "redis-in": {"kind": "redis", "url": "redis://127.0.0.1:6379/", "channel": "in.*"},
                "redis-out": {"kind": "redis", "url": "redis://127.0.0.1:6379/", "channel": "out.{id}"},
                "orders": {"kind": "room", "room": {"orders": "{channel}"}},
                "any-order": {"kind": "room", "room": {"orders": "*"}},
                "by-id": {"kind": "room", "room": {"id": "*"}},
                "hook": {"kind": "webhook", "url": "http://127.0.0.1:9/h"},
                "django": {"kind": "amqp", "url": "amqp://127.0.0.1:5672/%2f", "preset": "hightemplar"},
                "from-message": {"kind": "room"}
            },
            "routes": {
                "in": {"from": "redis-in", "to": ["orders"]},
                "out": {"from": "by-id", "to": ["redis-out", "hook"]},
                "django": {"from": "django", "to": ["from-message"]}
            }
        })
    }

    #[test]
    fn a_sound_table_passes() {
        let t = table(base());
        t.validate().unwrap();
        let external: Vec<_> = t.external_sources().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(external, ["django", "in"]);
    }

    #[test]
    fn unknown_endpoints_and_bad_roles_are_refused() {
        let t = table(base());
        let err = t
            .with_route(
                "x",
                Route {
                    from: "nope".into(),
                    to: vec!["hook".into()],
                },
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "route \"x\": unknown endpoint \"nope\"");
        let err = t
            .with_route(
                "x",
                Route {
                    from: "hook".into(),
                    to: vec!["orders".into()],
                },
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("webhook can only be a destination"),
            "{err}"
        );
        let err = t
            .with_route(
                "x",
                Route {
                    from: "redis-in".into(),
                    to: vec!["from-message".into()],
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("does not carry rooms"), "{err}");
        let err = t
            .with_route(
                "x",
                Route {
                    from: "redis-in".into(),
                    to: vec![],
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("no destinations"), "{err}");
        let err = t
            .with_route(
                "bad name",
                Route {
                    from: "redis-in".into(),
                    to: vec!["hook".into()],
                },
            )
            .unwrap_err();
        assert!(matches!(err, RouteError::BadName { .. }));
    }

    #[test]
    fn cycles_through_rooms_and_brokers_are_refused() {
        let t = table(base());
        // redis in.* -> room {orders} -> (route) -> redis in.x: back to the first source.
        let mut t2 = t
            .with_endpoint(
                "redis-loop",
                serde_json::from_value(json!({"kind": "redis", "url": "redis://127.0.0.1:6379", "channel": "in.{orders}"})).unwrap(),
            )
            .unwrap();
        let err = t2
            .with_route(
                "back",
                Route {
                    from: "any-order".into(),
                    to: vec!["redis-loop".into()],
                },
            )
            .unwrap_err();
        assert!(
            matches!(&err, RouteError::Cycle(path) if path.contains("back") && path.contains("in")),
            "{err}"
        );
        // The same channel on another server is no cycle.
        t2.endpoints.insert(
            "redis-elsewhere".into(),
            serde_json::from_value(
                json!({"kind": "redis", "url": "redis://127.0.0.2:6379", "channel": "in.{orders}"}),
            )
            .unwrap(),
        );
        t2.with_route(
            "away",
            Route {
                from: "any-order".into(),
                to: vec!["redis-elsewhere".into()],
            },
        )
        .unwrap();
        // room -> room loops are cycles too.
        let err = t
            .with_route(
                "self",
                Route {
                    from: "any-order".into(),
                    to: vec!["orders".into()],
                },
            )
            .unwrap_err();
        assert!(matches!(err, RouteError::Cycle(_)), "{err}");
    }

    #[test]
    fn endpoints_in_use_cannot_be_removed() {
        let t = table(base());
        assert!(matches!(
            t.without_endpoint("hook"),
            Err(RouteError::InUse { .. })
        ));
        let mut t = t;
        t.routes.remove("out");
        assert!(!t
            .without_endpoint("hook")
            .unwrap()
            .endpoints
            .contains_key("hook"));
    }
}
