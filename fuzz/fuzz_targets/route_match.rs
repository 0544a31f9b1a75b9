//! Fuzzes route matching with arbitrary match blocks and requests: never panics, and the
//! answers agree with what the conditions say (an exact URI condition built from the
//! request's own path matches it, so does an empty prefix, and a case-insensitive exact
//! condition matches the path in upper case).
//!
//! `fuzz/run 60 route_match`

#![no_main]

use http::{HeaderName, Request};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_routing::matcher::{
    HeaderMatch, QueryParamMatch, RequestView, RouteMatch, StringMatch, UriMatch,
};

#[derive(Arbitrary, Debug)]
enum Kind {
    Exact(String),
    Prefix(String),
    Regex(String),
}

impl Kind {
    fn build(&self) -> Option<StringMatch> {
        match self {
            Kind::Exact(s) => Some(StringMatch::exact(s.clone())),
            Kind::Prefix(s) => Some(StringMatch::prefix(s.clone())),
            Kind::Regex(r) => StringMatch::regex(r).ok(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    uri: Option<(Kind, bool)>,
    method: Option<Kind>,
    authority: Option<Kind>,
    headers: Vec<(String, Option<Kind>, bool)>,
    query: Vec<(String, Option<Kind>)>,
    port: Option<u16>,
    request_method: String,
    target: String,
    host: String,
    request_headers: Vec<(String, Vec<u8>)>,
}

fuzz_target!(|input: Input| {
    let mut builder = Request::builder()
        .method(input.request_method.as_str())
        .uri(input.target.as_str())
        .header("host", input.host.as_str());
    for (name, value) in &input.request_headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    let view = RequestView::from_request(&req, Some(8080));
    let mut block = RouteMatch {
        uri: input.uri.as_ref().and_then(|(k, ignore_case)| {
            Some(UriMatch { matcher: k.build()?, ignore_case: *ignore_case })
        }),
        method: input.method.as_ref().and_then(Kind::build),
        authority: input.authority.as_ref().and_then(Kind::build),
        port: input.port,
        ..RouteMatch::any()
    };
    for (name, kind, without) in &input.headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        let matcher = kind.as_ref().and_then(Kind::build);
        block.headers.push(if *without {
            HeaderMatch::without(name, matcher)
        } else {
            HeaderMatch::new(name, matcher)
        });
    }
    for (name, kind) in &input.query {
        block.query_params.push(QueryParamMatch {
            name: name.clone(),
            matcher: kind.as_ref().and_then(Kind::build),
        });
    }
    let _ = block.matches(&view);

    let path = view.path.to_owned();
    let only = |uri: UriMatch| RouteMatch { uri: Some(uri), ..RouteMatch::any() };
    assert!(only(UriMatch { matcher: StringMatch::exact(path.clone()), ignore_case: false }).matches(&view));
    assert!(only(UriMatch { matcher: StringMatch::prefix(""), ignore_case: false }).matches(&view));
    let upper = only(UriMatch { matcher: StringMatch::exact(path.to_ascii_uppercase()), ignore_case: true });
    assert!(upper.matches(&view));
    assert!(RouteMatch::any().matches(&view));
});
