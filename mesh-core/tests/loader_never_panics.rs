//! Arbitrary input never panics the loader, and every error it reports is located.

use mesh_core::config::{LoadOptions, load_str};
use proptest::prelude::*;

const SAMPLES: &[&str] = &[
    include_str!("fixtures/istio-samples/bookinfo-gateway.yaml"),
    include_str!("fixtures/istio-samples/destination-rule-all-mtls.yaml"),
    include_str!("fixtures/istio-samples/fault-injection-details-v1.yaml"),
    include_str!("fixtures/istio-samples/security-v1-AuthorizationPolicy.yaml"),
    include_str!("fixtures/istio-samples/security-v1beta1-PeerAuthentication.yaml"),
    include_str!("fixtures/istio-samples/tcp-echo-all-v1.yaml"),
    include_str!("fixtures/article/canary-order-service.yaml"),
    include_str!("fixtures/article/payment-service-resilience.yaml"),
    include_str!("fixtures/article/api-gateway.yaml"),
];

/// Loads `text` and checks the report's invariants.
fn check(text: &str) -> Result<(), TestCaseError> {
    let report = load_str("fuzz.yaml", text, &LoadOptions::default());
    for d in report.errors() {
        prop_assert!(
            d.line.is_some() && d.column.is_some(),
            "unlocated error: {d}"
        );
        prop_assert!(d.document.is_some(), "error without document: {d}");
        prop_assert!(!d.message.is_empty());
    }
    // Rendering never panics either.
    for d in &report.diagnostics {
        let _ = d.to_string();
    }
    for r in &report.resources {
        let _ = r.summary();
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    Replace { at: usize, text: String },
    SwapLines { a: usize, b: usize },
    Indent { line: usize, spaces: usize },
}

fn apply(text: &str, edit: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    let clamp = |i: usize| i % (chars.len() + 1);
    match edit {
        Edit::Delete { at, len } => {
            let a = clamp(*at);
            let b = (a + len).min(chars.len());
            chars[..a].iter().chain(&chars[b..]).collect()
        }
        Edit::Insert { at, text } => {
            let a = clamp(*at);
            chars[..a]
                .iter()
                .chain(text.chars().collect::<Vec<_>>().iter())
                .chain(&chars[a..])
                .collect()
        }
        Edit::Replace { at, text } => {
            let a = clamp(*at);
            let b = (a + text.chars().count()).min(chars.len());
            chars[..a]
                .iter()
                .chain(text.chars().collect::<Vec<_>>().iter())
                .chain(&chars[b..])
                .collect()
        }
        Edit::SwapLines { a, b } => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let (a, b) = (a % lines.len(), b % lines.len());
                lines.swap(a, b);
            }
            lines.join("\n")
        }
        Edit::Indent { line, spaces } => {
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if !lines.is_empty() {
                let i = line % lines.len();
                lines[i] = format!("{}{}", " ".repeat(*spaces), lines[i]);
            }
            lines.join("\n")
        }
    }
}

fn yaml_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(": ".to_owned()),
        Just("- ".to_owned()),
        Just("\n".to_owned()),
        Just("---\n".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("&a ".to_owned()),
        Just("*a".to_owned()),
        Just("<<: ".to_owned()),
        Just("!!str ".to_owned()),
        Just("\"".to_owned()),
        Just("'".to_owned()),
        Just("|\n".to_owned()),
        Just("#".to_owned()),
        Just("\t".to_owned()),
        Just("-1".to_owned()),
        Just("99999999999".to_owned()),
        Just("1.5s".to_owned()),
        Just("null".to_owned()),
        Just("~".to_owned()),
        "[a-zA-Z0-9_./*-]{1,12}",
        "\\PC{1,4}",
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), yaml_token()).prop_map(|(at, text)| Edit::Insert { at, text }),
        (any::<usize>(), yaml_token()).prop_map(|(at, text)| Edit::Replace { at, text }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        (any::<usize>(), 0usize..6).prop_map(|(line, spaces)| Edit::Indent { line, spaces }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        check(&text)?;
    }

    #[test]
    fn yaml_shaped_noise_never_panics(tokens in prop::collection::vec(yaml_token(), 0..60)) {
        check(&tokens.concat())?;
    }

    #[test]
    fn edited_istio_documents_never_panic(
        sample in 0..SAMPLES.len(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let mut text = SAMPLES[sample].to_owned();
        for e in &edits {
            text = apply(&text, e);
        }
        check(&text)?;
    }
}

#[test]
fn alias_bombs_are_stopped_with_a_located_error() {
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = format!("*a{}", i - 1);
        bomb.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            [prev.as_str(); 10].join(", ")
        ));
    }
    let doc = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\nspec:\n  hosts: [r]\nstatus:\n{}",
        bomb.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    let report = load_str("bomb.yaml", &doc, &LoadOptions::default());
    let errors: Vec<_> = report.errors().collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].line.is_some());
    assert!(
        errors[0]
            .message
            .starts_with("the document exceeds the parser's limits"),
        "{}",
        errors[0]
    );
}
