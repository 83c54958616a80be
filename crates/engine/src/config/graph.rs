//! Ordering stages.

use std::collections::HashMap;

/// Kahn's algorithm over `(stage, inputs)`; ties keep file order so runs are reproducible.
/// On a cycle, returns the stages of one cycle, first one repeated at the end.
pub fn topo_order(edges: &[(String, Vec<String>)]) -> Result<Vec<String>, Vec<String>> {
    let index: HashMap<&str, usize> = edges.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    let mut indeg: Vec<usize> = edges.iter().map(|(_, ins)| ins.iter().filter(|i| index.contains_key(i.as_str())).count()).collect();
    let mut order = Vec::with_capacity(edges.len());
    let mut done = vec![false; edges.len()];
    loop {
        let Some(next) = (0..edges.len()).find(|&i| !done[i] && indeg[i] == 0) else { break };
        done[next] = true;
        order.push(edges[next].0.clone());
        for (j, (_, ins)) in edges.iter().enumerate() {
            if !done[j] {
                indeg[j] -= ins.iter().filter(|i| **i == edges[next].0).count();
            }
        }
    }
    if order.len() == edges.len() {
        return Ok(order);
    }
    // Walk inputs among the unfinished stages until one repeats: that is a cycle.
    let start = (0..edges.len()).find(|&i| !done[i]).unwrap_or(0);
    let mut path = vec![start];
    loop {
        let cur = *path.last().unwrap_or(&start);
        let Some(nxt) = edges[cur].1.iter().filter_map(|i| index.get(i.as_str()).copied()).find(|&j| !done[j]) else {
            return Err(vec![edges[cur].0.clone()]);
        };
        if let Some(pos) = path.iter().position(|&p| p == nxt) {
            let mut cycle: Vec<String> = path[pos..].iter().rev().map(|&i| edges[i].0.clone()).collect();
            cycle.push(cycle[0].clone());
            return Err(cycle);
        }
        path.push(nxt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(v: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        v.iter().map(|(n, i)| (n.to_string(), i.iter().map(|s| s.to_string()).collect())).collect()
    }

    #[test]
    fn orders_inputs_first() {
        let o = topo_order(&e(&[("c", &["b"]), ("a", &[]), ("b", &["a"])])).unwrap();
        assert_eq!(o, vec!["a", "b", "c"]);
    }

    #[test]
    fn reports_a_cycle() {
        let c = topo_order(&e(&[("a", &[]), ("b", &["a", "d"]), ("c", &["b"]), ("d", &["c"])])).unwrap_err();
        assert_eq!(c.first(), c.last());
        for s in ["b", "c", "d"] {
            assert!(c.contains(&s.to_string()), "{c:?}");
        }
        assert!(!c.contains(&"a".to_string()));
    }
}
