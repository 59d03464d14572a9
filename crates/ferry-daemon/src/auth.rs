//! Users, roles and bearer tokens.
//!
//! Users live in `STATE/users.json` (mode 0600, replaced atomically) with Argon2id password
//! hashes (the `argon2` crate's PHC strings). A login issues a session token (12 h); a user may
//! also create named API tokens (optionally expiring) for scripts. Only SHA-256 hashes of
//! tokens are stored: the token itself is shown once. Every route states the role it needs:
//! viewer (read), operator (run and cancel jobs), admin (change configuration and users).

use crate::fsutil::write_atomic;
use crate::problem::{ApiResult, Problem};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use ferry_core::Secret;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a user may do; each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but secrets.
    Viewer,
    /// Also runs and cancels jobs, tests connections.
    Operator,
    /// Also changes sources, repositories, jobs and users.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// A stored user.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRecord {
    name: String,
    role: Role,
    /// PHC string (`$argon2id$…`).
    password_hash: String,
    created: i64,
}

/// Session (login) or API token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Issued by `POST /api/login`; expires after 12 hours.
    Session,
    /// Created by a user for scripts.
    Api,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    id: String,
    user: String,
    kind: TokenKind,
    name: String,
    /// Hex SHA-256 of the token.
    hash: String,
    created: i64,
    expires: Option<i64>,
}

#[derive(Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<UserRecord>,
    tokens: Vec<TokenRecord>,
}

/// A user as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct UserView {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Unix seconds.
    pub created: i64,
}

/// A token as the API lists it (never the token itself).
#[derive(Clone, Debug, Serialize)]
pub struct TokenView {
    /// Id (for revoking).
    pub id: String,
    /// Session or API.
    pub kind: TokenKind,
    /// The name given at creation.
    pub name: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds, if it expires.
    pub expires: Option<i64>,
}

/// Who made a request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// User name.
    pub user: String,
    /// Role.
    pub role: Role,
    /// The token's id.
    pub token_id: String,
}

impl Caller {
    /// 403 unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> ApiResult<()> {
        if self.role >= role {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this needs the {role} role; user `{}` is {}",
                self.user, self.role
            )))
        }
    }
}

/// Session tokens live this long.
pub const SESSION_SECONDS: i64 = 12 * 3600;

/// The user store.
pub struct Users {
    path: PathBuf,
    state: Mutex<UsersFile>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(crate) fn token_hash(token: &str) -> String {
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn random_b64(n: usize) -> Result<String, Problem> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| Problem::internal(format!("no randomness: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// Hashes `password` with Argon2id and a random salt.
pub fn hash_password(password: &Secret) -> Result<String, Problem> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| Problem::internal(format!("no randomness: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| Problem::internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Problem::internal(format!("cannot hash the password: {e}")))
}

fn verify_password(password: &Secret, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.expose().as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A user name: 1–64 of `[A-Za-z0-9._@-]`.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
}

impl Users {
    /// Loads `STATE/users.json` (absent: no users).
    pub fn load(state_dir: &Path) -> Result<Self, crate::DaemonError> {
        let path = state_dir.join("users.json");
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| crate::DaemonError::State(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => UsersFile::default(),
            Err(e) => {
                return Err(crate::DaemonError::State(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        Ok(Self {
            path,
            state: Mutex::new(state),
        })
    }

    fn save(&self, f: &UsersFile) -> ApiResult<()> {
        let data = serde_json::to_vec_pretty(f).map_err(|e| Problem::internal(e.to_string()))?;
        write_atomic(&self.path, &data, 0o600)
            .map_err(|e| Problem::internal(format!("cannot write {}: {e}", self.path.display())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UsersFile> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many users exist.
    pub fn count(&self) -> usize {
        self.lock().users.len()
    }

    /// All users.
    pub fn list(&self) -> Vec<UserView> {
        self.lock()
            .users
            .iter()
            .map(|u| UserView {
                name: u.name.clone(),
                role: u.role,
                created: u.created,
            })
            .collect()
    }

    /// Adds a user; 409 if the name is taken.
    pub fn add(&self, name: &str, role: Role, password: &Secret) -> ApiResult<UserView> {
        if !valid_user_name(name) {
            return Err(Problem::invalid(
                "name",
                format!("user name `{name}`: use 1 to 64 letters, digits, `.`, `_`, `@` or `-`"),
            ));
        }
        if password.expose().chars().count() < 8 {
            return Err(Problem::invalid(
                "password",
                "the password must have at least 8 characters",
            ));
        }
        let hash = hash_password(password)?;
        let mut st = self.lock();
        if st.users.iter().any(|u| u.name == name) {
            return Err(Problem::conflict(format!("user `{name}` exists")));
        }
        let rec = UserRecord {
            name: name.into(),
            role,
            password_hash: hash,
            created: now(),
        };
        let mut next = st.clone();
        next.users.push(rec.clone());
        self.save(&next)?;
        *st = next;
        Ok(UserView {
            name: rec.name,
            role,
            created: rec.created,
        })
    }

    /// Removes a user and their tokens; the last admin cannot be removed.
    pub fn remove(&self, name: &str) -> ApiResult<()> {
        let mut st = self.lock();
        let Some(u) = st.users.iter().find(|u| u.name == name) else {
            return Err(Problem::not_found(format!("user `{name}`")));
        };
        if u.role == Role::Admin && st.users.iter().filter(|u| u.role == Role::Admin).count() == 1 {
            return Err(Problem::conflict(format!(
                "user `{name}` is the last admin; add another admin first"
            )));
        }
        let mut next = st.clone();
        next.users.retain(|u| u.name != name);
        next.tokens.retain(|t| t.user != name);
        self.save(&next)?;
        *st = next;
        Ok(())
    }

    /// Checks a password; a session token on success. The same work is done for unknown users
    /// (a dummy hash) so timing does not tell which names exist.
    pub fn login(&self, name: &str, password: &Secret) -> ApiResult<(String, TokenView, Role)> {
        let found = self
            .lock()
            .users
            .iter()
            .find(|u| u.name == name)
            .map(|u| (u.password_hash.clone(), u.role));
        let ok = match &found {
            Some((h, _)) => verify_password(password, h),
            None => {
                let _ = verify_password(password, DUMMY_HASH);
                false
            }
        };
        match (ok, found) {
            (true, Some((_, role))) => {
                let (t, v) =
                    self.issue(name, TokenKind::Session, "login", Some(SESSION_SECONDS))?;
                Ok((t, v, role))
            }
            _ => Err(Problem::unauthorized("wrong user name or password")),
        }
    }

    /// Creates a token for `user`.
    pub fn issue(
        &self,
        user: &str,
        kind: TokenKind,
        name: &str,
        lifetime: Option<i64>,
    ) -> ApiResult<(String, TokenView)> {
        let token = format!("fy_{}", random_b64(32)?);
        let t = now();
        let rec = TokenRecord {
            id: random_b64(9)?,
            user: user.into(),
            kind,
            name: name.into(),
            hash: token_hash(&token),
            created: t,
            expires: lifetime.map(|l| t + l),
        };
        let mut st = self.lock();
        let mut next = st.clone();
        // Expired tokens go whenever the file is written anyway.
        next.tokens.retain(|x| x.expires.is_none_or(|e| e > t));
        next.tokens.push(rec.clone());
        self.save(&next)?;
        *st = next;
        Ok((token, view(&rec)))
    }

    /// The tokens of `user`.
    pub fn tokens(&self, user: &str) -> Vec<TokenView> {
        self.lock()
            .tokens
            .iter()
            .filter(|t| t.user == user)
            .map(view)
            .collect()
    }

    /// Revokes token `id` of `user` (admins: of anyone).
    pub fn revoke(&self, caller: &Caller, id: &str) -> ApiResult<()> {
        let mut st = self.lock();
        let Some(t) = st.tokens.iter().find(|t| t.id == id) else {
            return Err(Problem::not_found(format!("token `{id}`")));
        };
        if t.user != caller.user && caller.role != Role::Admin {
            return Err(Problem::not_found(format!("token `{id}`")));
        }
        let mut next = st.clone();
        next.tokens.retain(|t| t.id != id);
        self.save(&next)?;
        *st = next;
        Ok(())
    }

    /// Who holds `token`, if it is valid.
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        let h = token_hash(token);
        let st = self.lock();
        let t = st.tokens.iter().find(|t| t.hash == h)?;
        if t.expires.is_some_and(|e| e <= now()) {
            return None;
        }
        let u = st.users.iter().find(|u| u.name == t.user)?;
        Some(Caller {
            user: u.name.clone(),
            role: u.role,
            token_id: t.id.clone(),
        })
    }
}

fn view(t: &TokenRecord) -> TokenView {
    TokenView {
        id: t.id.clone(),
        kind: t.kind,
        name: t.name.clone(),
        created: t.created,
        expires: t.expires,
    }
}

/// A valid Argon2id hash of a random string, verified against for unknown users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0m3Fp8dz3oY0i5o5pS8b6iR8m9hC4fJtQ3x0N1Qd5mA";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_tokens_roles_and_the_file_hold_no_secret() {
        let d = tempfile::tempdir().unwrap();
        let u = Users::load(d.path()).unwrap();
        assert_eq!(u.count(), 0);
        u.add("alice", Role::Admin, &Secret::new("correct horse"))
            .unwrap();
        assert!(
            u.add("alice", Role::Viewer, &Secret::new("other pass"))
                .is_err()
        );
        let e = u
            .add("bob", Role::Viewer, &Secret::new("short"))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("password"));
        let e = u
            .add("bad name", Role::Viewer, &Secret::new("long enough"))
            .unwrap_err();
        assert_eq!(e.status, 422);
        assert_eq!(
            u.login("alice", &Secret::new("wrong")).unwrap_err().status,
            401
        );
        assert_eq!(
            u.login("nobody", &Secret::new("correct horse"))
                .unwrap_err()
                .status,
            401
        );
        let (tok, _, role) = u.login("alice", &Secret::new("correct horse")).unwrap();
        assert_eq!(role, Role::Admin);
        let c = u.authenticate(&tok).unwrap();
        assert_eq!(c.user, "alice");
        assert!(u.authenticate("fy_forged").is_none());
        // A second load sees the same users and tokens; the file has hashes only.
        let text = std::fs::read_to_string(d.path().join("users.json")).unwrap();
        assert!(
            !text.contains("correct horse") && !text.contains(&tok),
            "{text}"
        );
        assert!(text.contains("$argon2id$"));
        let u2 = Users::load(d.path()).unwrap();
        assert_eq!(u2.authenticate(&tok).unwrap().role, Role::Admin);
        // Roles are ordered; the last admin stays.
        assert!(c.require(Role::Admin).is_ok());
        u.add("vic", Role::Viewer, &Secret::new("viewer pass"))
            .unwrap();
        let (vt, _, _) = u.login("vic", &Secret::new("viewer pass")).unwrap();
        let v = u.authenticate(&vt).unwrap();
        assert_eq!(v.require(Role::Operator).unwrap_err().status, 403);
        assert_eq!(u.remove("alice").unwrap_err().status, 409);
        // Revoking ends a token; removing a user ends theirs.
        u.revoke(&c, &c.token_id).unwrap();
        assert!(u.authenticate(&tok).is_none());
        u.remove("vic").unwrap();
        assert!(u.authenticate(&vt).is_none());
    }

    #[test]
    fn the_dummy_hash_parses() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
