//! JWT authorization: a token in `?token=` or `Authorization: Bearer`, signed with HS256, RS256 or ES256.
//!
//! Claims: `exp` (required; expired tokens are refused), `sub` (the user id, optional), `allowed_rooms`
//! (a list of rooms, optional, empty when absent) and `allowed_methods` (RPC method names or `*`, optional, none
//! when absent). The token's `alg` header picks the key; an algorithm with no
//! configured key is refused, so a token can never choose a weaker check than the operator configured.

use http::request::Parts;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::{
    parse_allowed_methods, parse_allowed_rooms, query_param, AuthConfigError, Denial, Grant,
    Permissions,
};
use crate::config::JwtConfig;

/// Verifies connection tokens.
pub struct JwtAuth {
    keys: Vec<(Algorithm, DecodingKey)>,
    leeway: u64,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithms: Vec<_> = self.keys.iter().map(|(a, _)| a).collect();
        f.debug_struct("JwtAuth")
            .field("algorithms", &algorithms)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<Value>,
    #[serde(default)]
    allowed_rooms: Option<Value>,
    #[serde(default)]
    allowed_methods: Option<Value>,
}

impl JwtAuth {
    /// Loads the configured keys; a malformed PEM is a startup error.
    pub fn new(config: &JwtConfig) -> Result<Self, AuthConfigError> {
        let mut keys = vec![];
        if !config.hs256_secret.is_empty() {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(config.hs256_secret.as_bytes()),
            ));
        }
        if !config.rs256_public_key.is_empty() {
            let key = DecodingKey::from_rsa_pem(config.rs256_public_key.as_bytes())
                .map_err(|e| AuthConfigError::new("auth.jwt.rs256-public-key", e))?;
            keys.push((Algorithm::RS256, key));
        }
        if !config.es256_public_key.is_empty() {
            let key = DecodingKey::from_ec_pem(config.es256_public_key.as_bytes())
                .map_err(|e| AuthConfigError::new("auth.jwt.es256-public-key", e))?;
            keys.push((Algorithm::ES256, key));
        }
        if keys.is_empty() {
            return Err(AuthConfigError::new("auth.jwt", "no JWT key configured"));
        }
        Ok(JwtAuth {
            keys,
            leeway: config.leeway_secs,
        })
    }

    /// Verifies the request's token.
    pub fn authorize(&self, request: &Parts) -> Result<Grant, Denial> {
        let token = token(request).ok_or_else(|| Denial::new("refused", "no token"))?;
        self.verify(&token)
    }

    pub(crate) fn verify(&self, token: &str) -> Result<Grant, Denial> {
        let header =
            decode_header(token).map_err(|e| Denial::new("refused", format!("bad token: {e}")))?;
        let (algorithm, key) = self
            .keys
            .iter()
            .find(|(a, _)| *a == header.alg)
            .ok_or_else(|| {
                Denial::new("refused", format!("no key configured for {:?}", header.alg))
            })?;
        let mut validation = Validation::new(*algorithm);
        validation.leeway = self.leeway;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_aud = false;
        let data = decode::<Claims>(token, key, &validation)
            .map_err(|e| Denial::new("refused", format!("token rejected: {e}")))?;
        let allowed_rooms = data.claims.allowed_rooms.unwrap_or(Value::Array(vec![]));
        let rooms = parse_allowed_rooms(&allowed_rooms)?;
        let methods = parse_allowed_methods(data.claims.allowed_methods)?;
        let user_id = match data.claims.sub {
            Some(Value::String(s)) => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Ok(Grant {
            permissions: Permissions::Rooms(rooms),
            allowed_rooms,
            user_id,
            methods,
        })
    }
}

fn token(request: &Parts) -> Option<String> {
    if let Some(value) = request.headers.get(http::header::AUTHORIZATION) {
        if let Ok(text) = value.to_str() {
            if let Some(token) = text
                .strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
            {
                return Some(token.trim().to_owned());
            }
        }
    }
    query_param(&request.uri, "token")
}
