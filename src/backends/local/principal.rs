//! Dev mode's gateway principal: a subject of the tokens file. Calls through the gateway act
//! as that subject's entry (its namespace, workload or admin right), looked up for every call,
//! so removing the subject's tokens revokes the gateway's access within the file refresh.

use std::sync::Arc;

use super::tokens::TokenStore;
use crate::domain::ErrorCode;
use crate::invoke::InvokeError;
use crate::invoke::gateway::{Principal, PrincipalIdentity};

pub struct TokensPrincipal {
    tokens: Arc<TokenStore>,
    subject: String,
}

impl TokensPrincipal {
    pub fn new(tokens: Arc<TokenStore>, subject: String) -> Self {
        TokensPrincipal { tokens, subject }
    }
}

impl Principal for TokensPrincipal {
    async fn resolve(&self) -> Result<PrincipalIdentity, InvokeError> {
        match self.tokens.lookup_subject(&self.subject) {
            Ok(Ok(caller)) => Ok(PrincipalIdentity::Caller(caller)),
            Ok(Err(why)) => Err(InvokeError::new(
                ErrorCode::Unauthenticated,
                format!("the gateway principal cannot act: {why}"),
            )),
            // As for a bearer token over HTTP.
            Err(why) => Err(super::tokens_unreadable(why)),
        }
    }

    fn describe(&self) -> String {
        format!("tokens-file subject {:?}", self.subject)
    }
}
