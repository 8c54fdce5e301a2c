//! JSON Pointers (RFC 6901) to the values left out of a fingerprint, parsed once into a tree
//! that the canonical writer walks beside the document.

use std::fmt;

/// The pointers of a layer as a tree of reference tokens: the root is the document, a child
/// is one token further, and an `ignored` node's value (with everything under it) is left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Pointers {
    ignored: bool,
    children: Vec<(Box<[u8]>, Pointers)>,
}

/// A string that is not a JSON Pointer, or one that would leave out the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PointerError {
    pointer: String,
    reason: &'static str,
}

impl fmt::Display for PointerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a JSON Pointer (RFC 6901): {}",
            self.pointer, self.reason
        )
    }
}

impl Pointers {
    /// Parses `pointers`; `None` when there are none.
    pub(crate) fn parse<P: AsRef<str>>(
        pointers: impl IntoIterator<Item = P>,
    ) -> Result<Option<Self>, PointerError> {
        let mut root = Self::default();
        let mut any = false;
        for pointer in pointers {
            let pointer = pointer.as_ref();
            let tokens = tokens(pointer).map_err(|reason| PointerError {
                pointer: pointer.to_owned(),
                reason,
            })?;
            root.insert(tokens);
            any = true;
        }
        Ok(any.then_some(root))
    }

    fn insert(&mut self, tokens: Vec<Vec<u8>>) {
        let mut node = self;
        for token in tokens {
            if node.ignored {
                return; // a shorter pointer already leaves this whole value out
            }
            let at = match node.children.iter().position(|(t, _)| **t == *token) {
                Some(at) => at,
                None => {
                    node.children.push((token.into(), Self::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[at].1;
        }
        node.ignored = true;
        node.children = Vec::new();
    }

    /// Whether this node's value is left out.
    pub(crate) fn ignored(&self) -> bool {
        self.ignored
    }

    /// The node of the member whose decoded key `matches` a token.
    pub(crate) fn member(&self, matches: impl Fn(&[u8]) -> bool) -> Option<&Self> {
        self.children
            .iter()
            .find(|(token, _)| matches(token))
            .map(|(_, node)| node)
    }

    /// The node of the array element at `index` (the token `"0"`, `"1"`, ...; never `"-"` or a
    /// token with a leading zero).
    pub(crate) fn element(&self, index: usize) -> Option<&Self> {
        if self.children.is_empty() {
            return None;
        }
        let digits = crate::util::Decimal::of(index as u64);
        self.member(|token| token == digits.as_bytes())
    }
}

/// The reference tokens of `pointer`, unescaped (`~1` is `/`, `~0` is `~`).
fn tokens(pointer: &str) -> Result<Vec<Vec<u8>>, &'static str> {
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(if pointer.is_empty() {
            "the empty pointer is the whole body; use `fingerprint_with` to fingerprint \
             something else than the body"
        } else {
            "a pointer starts with `/`"
        });
    };
    rest.split('/')
        .map(|token| {
            let mut out = Vec::with_capacity(token.len());
            let mut bytes = token.bytes();
            while let Some(byte) = bytes.next() {
                match byte {
                    b'~' => match bytes.next() {
                        Some(b'0') => out.push(b'~'),
                        Some(b'1') => out.push(b'/'),
                        _ => return Err("`~` is written `~0` and `/` is written `~1`"),
                    },
                    byte => out.push(byte),
                }
            }
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pointers: &[&str]) -> Pointers {
        Pointers::parse(pointers).unwrap().unwrap()
    }

    fn path<'a>(root: &'a Pointers, tokens: &[&str]) -> Option<&'a Pointers> {
        tokens
            .iter()
            .try_fold(root, |node, token| node.member(|t| t == token.as_bytes()))
    }

    #[test]
    fn tokens_are_unescaped() {
        assert_eq!(
            tokens("/a~1b/m~0n").unwrap(),
            [b"a/b".to_vec(), b"m~n".to_vec()]
        );
        // `~01` is `~1` (a tilde, then a one), never `/`.
        assert_eq!(tokens("/~01").unwrap(), [b"~1".to_vec()]);
        assert_eq!(tokens("/").unwrap(), [Vec::<u8>::new()]);
        assert_eq!(
            tokens("/a//b").unwrap(),
            [b"a".to_vec(), Vec::<u8>::new(), b"b".to_vec()]
        );
        assert_eq!(tokens("/ünï").unwrap(), ["ünï".as_bytes().to_vec()]);
    }

    #[test]
    fn invalid_pointers_are_refused() {
        for bad in ["", "a", "timestamp", "#/a", "/a~", "/a~2", "/~a"] {
            let err = Pointers::parse([bad]).unwrap_err();
            assert!(err.to_string().contains("RFC 6901"), "{err}");
        }
        assert_eq!(Pointers::parse(Vec::<String>::new()).unwrap(), None);
    }

    #[test]
    fn a_tree_of_tokens() {
        let root = parse(&["/a/b", "/a/c", "/x", "/x/y", "/items/0/nonce"]);
        assert!(!root.ignored());
        assert!(path(&root, &["a", "b"]).unwrap().ignored());
        assert!(path(&root, &["a", "c"]).unwrap().ignored());
        assert!(!path(&root, &["a"]).unwrap().ignored());
        // A shorter pointer wins over a longer one, in either order.
        let x = path(&root, &["x"]).unwrap();
        assert!(x.ignored() && x.children.is_empty());
        let root2 = parse(&["/x/y", "/x"]);
        assert_eq!(
            path(&root2, &["x"]),
            Some(&Pointers {
                ignored: true,
                children: vec![]
            })
        );
        let items = path(&root, &["items"]).unwrap();
        assert!(
            items
                .element(0)
                .unwrap()
                .member(|t| t == b"nonce")
                .unwrap()
                .ignored()
        );
        assert!(items.element(1).is_none());
        assert!(path(&root, &["nothing"]).is_none());
    }

    #[test]
    fn array_indices() {
        let root = parse(&["/0", "/10", "/01", "/-", "/18446744073709551615"]);
        assert!(root.element(0).is_some());
        assert!(root.element(10).is_some());
        assert!(root.element(1).is_none(), "`01` is not an index");
        assert!(root.element(usize::MAX).is_some() == (usize::MAX as u128 == u64::MAX as u128));
        assert!(parse(&["/a"]).element(0).is_none());
    }
}
